//! `Range: bytes=…` for blob downloads.
//!
//! Docker resumes an interrupted layer with `Range: bytes=N-` and throws away what it had
//! unless the answer is a 206, so single ranges are honoured exactly. Multi-range requests,
//! which no registry client sends, are answered with the whole blob (RFC 9110 allows
//! ignoring Range).

/// A satisfiable byte range: `start..end`, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The `Content-Range` value for a blob of `size` bytes.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end - 1)
    }
}

/// What a Range header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable Range header: send everything with a 200.
    Full,
    /// One satisfiable range: a 206.
    Partial(ByteRange),
    /// A well-formed range entirely past the end: a 416.
    Unsatisfiable,
}

/// Parses a Range header value against the blob size.
pub fn parse(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else { return RangeRequest::Full };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| s.parse::<u64>().ok();
    let range = match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match number(last) {
            Some(0) => return RangeRequest::Unsatisfiable,
            Some(n) => ByteRange { start: size.saturating_sub(n), end: size },
            None => return RangeRequest::Full,
        },
        // bytes=N-: from N to the end.
        (false, true) => match number(first) {
            Some(start) => ByteRange { start, end: size },
            None => return RangeRequest::Full,
        },
        // bytes=A-B, B inclusive and clamped to the end.
        (false, false) => match (number(first), number(last)) {
            (Some(start), Some(last)) if last >= start => ByteRange { start, end: last.saturating_add(1).min(size) },
            _ => return RangeRequest::Full,
        },
        (true, true) => return RangeRequest::Full,
    };
    if range.start >= size { RangeRequest::Unsatisfiable } else { RangeRequest::Partial(range) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn single_ranges() {
        assert_eq!(parse(Some("bytes=0-99"), 1000), partial(0, 100));
        assert_eq!(parse(Some("bytes=100-"), 1000), partial(100, 1000));
        assert_eq!(parse(Some("bytes=-10"), 1000), partial(990, 1000));
        assert_eq!(parse(Some("bytes=-5000"), 1000), partial(0, 1000));
        assert_eq!(parse(Some("bytes=900-5000"), 1000), partial(900, 1000));
        assert_eq!(parse(Some("bytes=999-999"), 1000), partial(999, 1000));
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(parse(Some("bytes=1000-"), 1000), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 1000), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse(None, 1000), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=0-1,5-6"), 1000), RangeRequest::Full);
        assert_eq!(parse(Some("items=0-1"), 1000), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=5-1"), 1000), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=a-b"), 1000), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=-"), 1000), RangeRequest::Full);
    }

    #[test]
    fn content_range_is_inclusive() {
        assert_eq!(ByteRange { start: 0, end: 100 }.content_range(1000), "bytes 0-99/1000");
    }
}
