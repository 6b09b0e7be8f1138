//! `upstream::auth::parse_challenge` on any `WWW-Authenticate` header.
//!
//! The header comes from upstreams, and its realm decides where the mirror sends credentials
//! next. Beyond not panicking: a header built from any realm, service and scope (quoted and
//! escaped as RFC 7235 says) parses back to exactly those values, whatever commas, quotes or
//! spaces they hold, so no parameter can leak into another; and a raw header yields a
//! challenge only for the scheme it starts with.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use regmirror::upstream::auth::{Challenge, parse_challenge};

#[derive(Debug, Arbitrary)]
enum Input<'a> {
    Raw(&'a str),
    Bearer { spelling: Spelling, realm: &'a str, service: Option<&'a str>, scope: Option<&'a str>, spaced: bool },
    Basic { realm: &'a str },
}

/// How the scheme and parameter names are written: both are case-insensitive.
#[derive(Debug, Arbitrary)]
enum Spelling {
    Usual,
    Lower,
    Upper,
}

fuzz_target!(|input: Input| match input {
    Input::Raw(header) => raw(header),
    Input::Bearer { spelling, realm, service, scope, spaced } => {
        let separator = if spaced { ", " } else { "," };
        let mut header = format!("{} {}={}", spelling.apply("Bearer"), spelling.apply("realm"), quoted(realm));
        for (key, value) in [("service", service), ("scope", scope)] {
            if let Some(value) = value {
                header += &format!("{separator}{}={}", spelling.apply(key), quoted(value));
            }
        }
        let expected = Challenge::Bearer {
            realm: realm.trim().to_owned(),
            service: service.map(|s| s.trim().to_owned()),
            scope: scope.map(|s| s.trim().to_owned()),
        };
        assert_eq!(parse_challenge(&header), Some(expected), "{header}");
    }
    Input::Basic { realm } => {
        let header = format!("Basic realm={}", quoted(realm));
        assert_eq!(parse_challenge(&header), Some(Challenge::Basic), "{header}");
    }
});

fn raw(header: &str) {
    let scheme = header.trim().split(char::is_whitespace).next().unwrap_or_default();
    match parse_challenge(header) {
        None => {}
        Some(Challenge::Basic) => assert!(scheme.eq_ignore_ascii_case("basic"), "{header:?}"),
        Some(Challenge::Bearer { .. }) => {
            assert!(scheme.eq_ignore_ascii_case("bearer"), "{header:?}");
            assert!(header.to_ascii_lowercase().contains("realm"), "{header:?}");
        }
    }
}

/// A quoted-string: `"` and `\` escaped with `\`.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Spelling {
    fn apply(&self, word: &str) -> String {
        match self {
            Spelling::Usual => word.to_owned(),
            Spelling::Lower => word.to_ascii_lowercase(),
            Spelling::Upper => word.to_ascii_uppercase(),
        }
    }
}
