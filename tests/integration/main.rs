//! Integration tests: real registry clients pull through the real
//! `regmirror` binary from real upstream registries, all on 127.0.0.1.
//!
//! - `clients`: skopeo, ctr, dockerd and podman through a mirror.
//! - `air_gap`: seed, export, import, and an offline mirror serving the import.
//! - `deploy`: the files in `deploy/`, each through the tool that reads it,
//!   and their configs served by the real binary.
//! - `auth`: a token-auth upstream behind the mirror.
//! - `faults`: what only a hand-written upstream can do (wrong bytes, cut
//!   downloads, 429s, a full disk) against an in-process mirror.
//! - `replicas`: several mirrors sharing a real Garage cluster as one cache.
//! - `harness_checks`: the harness against the registries directly, with no
//!   mirror involved, so that failures in the other modules can be blamed on
//!   the mirror.
//!
//! Logs of every run are in `target/tmp/logs/run-<pid>-/`.

mod air_gap;
mod auth;
mod cache;
mod clients;
mod deploy;
mod faults;
mod harness;
mod harness_checks;
mod observability;
mod replicas;
mod security;
mod single_flight;
mod upstreams;
