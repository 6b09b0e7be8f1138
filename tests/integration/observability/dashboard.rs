//! Reading the Grafana dashboard the way Grafana does: its panels' queries,
//! its template variables, and the substitution of `$variables` into PromQL
//! so that the queries can be sent to a real Prometheus.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// `deploy/grafana/regmirror-dashboard.json` in this repository.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/regmirror-dashboard.json")
}

/// One query of one panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    /// `Panel title [refId]`, for messages.
    pub name: String,
    pub expr: String,
    /// The datasource the panel or target names.
    pub datasource: Value,
}

/// A template variable of type `query`, e.g. `label_values(metric, instance)`.
#[derive(Debug, Clone)]
pub struct QueryVariable {
    pub name: String,
    pub definition: String,
}

pub struct Dashboard {
    pub json: Value,
}

impl Dashboard {
    pub fn load() -> Result<Dashboard> {
        let path = path();
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Dashboard { json: serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))? })
    }

    /// Every panel, including those nested in collapsed rows.
    pub fn panels(&self) -> Vec<&Value> {
        fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
            for panel in panels.as_array().into_iter().flatten() {
                out.push(panel);
                walk(&panel["panels"], out);
            }
        }
        let mut out = Vec::new();
        walk(&self.json["panels"], &mut out);
        out
    }

    /// Every `targets[].expr` of every panel.
    pub fn queries(&self) -> Result<Vec<PanelQuery>> {
        let mut queries = Vec::new();
        for panel in self.panels() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                let ref_id = target["refId"].as_str().unwrap_or("?");
                let expr = target["expr"].as_str().with_context(|| format!("{title} [{ref_id}] has no expr"))?;
                let datasource = match &target["datasource"] {
                    Value::Null => panel["datasource"].clone(),
                    datasource => datasource.clone(),
                };
                queries.push(PanelQuery { name: format!("{title} [{ref_id}]"), expr: expr.to_owned(), datasource });
            }
        }
        Ok(queries)
    }

    /// The template variables of type `query`.
    pub fn query_variables(&self) -> Result<Vec<QueryVariable>> {
        self.variables()
            .filter(|variable| variable["type"] == "query")
            .map(|variable| {
                let name = variable["name"].as_str().context("variable without name")?.to_owned();
                let definition = match &variable["query"] {
                    Value::String(query) => query.clone(),
                    query => query["query"].as_str().with_context(|| format!("variable {name} without query"))?.into(),
                };
                Ok(QueryVariable { name, definition })
            })
            .collect()
    }

    /// The template variable called `name`.
    pub fn variable(&self, name: &str) -> Option<&Value> {
        self.variables().find(|variable| variable["name"] == name)
    }

    fn variables(&self) -> impl Iterator<Item = &Value> {
        self.json["templating"]["list"].as_array().into_iter().flatten()
    }
}

/// Replaces every `$name` and `${name}` in `text` with its value from
/// `values`; a variable without a value is an error, so a query can never
/// reach Prometheus with a `$` left in it.
pub fn substitute(text: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, consumed) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').with_context(|| format!("unterminated `${{` in `{text}`"))?;
                (&braced[..end], end + 2)
            }
            None => {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match values.iter().find(|(variable, _)| *variable == name) {
            Some((_, value)) => out.push_str(value),
            None => bail!("unknown variable `${name}` in `{text}`"),
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `(selector, label)` from Grafana's `label_values(selector, label)`.
pub fn parse_label_values(definition: &str) -> Result<(&str, &str)> {
    let arguments = definition
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .with_context(|| format!("`{definition}` is not label_values(selector, label)"))?;
    let (selector, label) = arguments.rsplit_once(',').with_context(|| format!("`{definition}` names no label"))?;
    Ok((selector.trim(), label.trim()))
}

/// The `regmirror_*` metric names used in `text` (PromQL or a rule file).
pub fn regmirror_metric_names(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("regmirror_") {
        let preceded_by_word = rest[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let end = rest[at..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(rest.len(), |n| at + n);
        if !preceded_by_word {
            names.push(&rest[at..end]);
        }
        rest = &rest[end..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_plain_and_braced_variables() {
        let values = [("job", "regmirror"), ("__rate_interval", "1m"), ("instance", "127.0.0.1:5000")];
        let expr = r#"rate(x{job=~"$job",instance=~"${instance}"}[$__rate_interval])"#;
        assert_eq!(substitute(expr, &values).unwrap(), r#"rate(x{job=~"regmirror",instance=~"127.0.0.1:5000"}[1m])"#);
        assert!(substitute("x[$__range]", &values).is_err());
        assert!(substitute("x{a=\"${job\"}", &values).is_err());
    }

    #[test]
    fn parses_label_values() {
        assert_eq!(
            parse_label_values(r#"label_values(up{job=~"$job"}, instance)"#).unwrap(),
            (r#"up{job=~"$job"}"#, "instance")
        );
        assert!(parse_label_values("query_result(up)").is_err());
    }

    #[test]
    fn finds_metric_names() {
        let text = "sum(rate(regmirror_a_total{x=\"y\"}[1m])) / not_regmirror_b + regmirror_c_bucket";
        assert_eq!(regmirror_metric_names(text), vec!["regmirror_a_total", "regmirror_c_bucket"]);
    }
}
