//! Reading what `pgpitr status` and `pgpitr metrics` say: the JSON report and its checks, the
//! Prometheus exposition parsed by `prometheus-parse` (never matched as strings), and a plain
//! HTTP GET for `--listen` and for a Prometheus server's API.

use std::io::{Read, Write};
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};

use crate::cli::{pgpitr, pgpitr_ok, text, Env};

/// Parses a Prometheus text exposition, panicking with it when it does not parse.
pub fn parse(exposition: &str) -> Scrape {
    Scrape::parse(exposition.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("unparsable exposition: {e}\n{exposition}"))
}

/// The value of a gauge, counter or untyped sample.
pub fn value(s: &Sample) -> f64 {
    match s.value {
        Value::Gauge(v) | Value::Untyped(v) | Value::Counter(v) => v,
        _ => panic!("not a single value: {s:?}"),
    }
}

/// The value of the series `name` (with `timeline` when given); `None` when absent.
pub fn series(scrape: &Scrape, name: &str, timeline: Option<&str>) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("timeline") == timeline)
        .map(value)
}

/// [`series`], which must exist.
pub fn must(scrape: &Scrape, name: &str, timeline: Option<&str>) -> f64 {
    series(scrape, name, timeline)
        .unwrap_or_else(|| panic!("no series {name} {timeline:?}: {:?}", scrape.samples))
}

/// `pgpitr metrics`, parsed.
pub fn metrics(env: &Env) -> Scrape {
    parse(&pgpitr_ok(env, &["metrics"]))
}

/// `pgpitr status --json` and its exit code.
pub fn status(env: &Env) -> (serde_json::Value, i32) {
    let out = pgpitr(env, &["status", "--json"]);
    let json =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (json, out.status.code().unwrap())
}

/// The check `name` of a status report.
pub fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report:#}"))
}

/// `GET path` over HTTP/1.0 from `addr` (`host:port`): the status code and the body; `None`
/// when nothing answers (yet).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}
