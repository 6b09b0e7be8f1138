//! Reading counters from the mirror's Prometheus text exposition.

use anyhow::{Context, Result, bail};

/// One scrape of `/metrics`.
pub struct Metrics {
    samples: Vec<Sample>,
}

struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Metrics> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).with_context(|| format!("bad metrics line `{line}`")))
            .collect::<Result<_>>()?;
        Ok(Metrics { samples })
    }

    /// The sum of `name` over every sample whose labels include all of
    /// `filter` (so an empty filter sums over all label values); 0 when the
    /// counter has not been created yet.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|sample| sample.name == name)
            .filter(|sample| {
                filter.iter().all(|(key, value)| sample.labels.iter().any(|(k, v)| k == key && v == value))
            })
            .map(|sample| sample.value)
            .sum()
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (series, value) = line.rsplit_once(' ').context("no value after the series")?;
    let value = value.parse().context("value is not a number")?;
    let Some((name, labels)) = series.split_once('{') else {
        return Ok(Sample { name: series.to_owned(), labels: Vec::new(), value });
    };
    let labels = labels.strip_suffix('}').context("unterminated labels")?;
    Ok(Sample { name: name.to_owned(), labels: parse_labels(labels)?, value })
}

/// Parses `a="x",b="y \"quoted\""`.
fn parse_labels(mut rest: &str) -> Result<Vec<(String, String)>> {
    let mut labels = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without a value")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, escaped)) => value.push(escaped),
                    None => bail!("dangling escape"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn sums_counters_over_matching_labels() {
        let metrics = Metrics::parse(
            "# HELP x\n# TYPE regmirror_cache_hits_total counter\n\
             regmirror_cache_hits_total{kind=\"blob\"} 3\n\
             regmirror_cache_hits_total{kind=\"manifest\"} 2\n\
             regmirror_upstream_requests_total{upstream=\"docker.io\",kind=\"blob\",status=\"200\"} 4\n\
             regmirror_upstream_requests_total{upstream=\"a \\\"b\\\"\",kind=\"blob\",status=\"404\"} 1\n\
             plain 7\n",
        )
        .unwrap();
        assert_eq!(metrics.sum("regmirror_cache_hits_total", &[]), 5.0);
        assert_eq!(metrics.sum("regmirror_cache_hits_total", &[("kind", "blob")]), 3.0);
        let upstream = "regmirror_upstream_requests_total";
        assert_eq!(metrics.sum(upstream, &[("kind", "blob")]), 5.0);
        assert_eq!(metrics.sum(upstream, &[("upstream", "a \"b\"")]), 1.0);
        assert_eq!(metrics.sum("plain", &[]), 7.0);
        assert_eq!(metrics.sum("missing", &[]), 0.0);
    }
}
