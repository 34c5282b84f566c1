//! `migtun healthcheck`: GETs the agent's `/healthz` (or `/readyz`) and exits 0 when it answers
//! 200, 1 otherwise, with one line saying why. For container HEALTHCHECKs and scripts on hosts
//! without curl; plain HTTP only (the metrics listener serves no TLS).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

/// Connect, send and receive each within this long: a health check that hangs is a failed one,
/// and container runtimes have their own, longer, timeout around it.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The most of the answer read: `/readyz` is a few hundred bytes per peer; a larger answer is
/// not from migtun.
const MAX_RESPONSE: u64 = 256 * 1024;

/// Where to ask: a URL, the metrics address, or the `metrics` key of a config.
pub enum Target<'a> {
    Url(&'a str),
    Metrics(&'a str),
    Config(&'a Path),
}

pub fn run(target: Target<'_>, ready: bool) -> anyhow::Result<()> {
    let path = if ready { "/readyz" } else { "/healthz" };
    let (host, addr_text, path) = match target {
        Target::Url(url) => {
            let rest = url
                .strip_prefix("http://")
                .with_context(|| format!("--url {url:?}: only http:// URLs (the metrics listener serves plain HTTP)"))?;
            let (authority, p) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_string()),
                None => (rest, path.to_string()),
            };
            (authority.to_string(), authority.to_string(), p)
        }
        Target::Metrics(addr) => (addr.to_string(), addr.to_string(), path.to_string()),
        Target::Config(file) => {
            let config = migtun_proxy::Config::load(file)?;
            let Some(addr) = config.metrics else {
                bail!("{}: no `metrics` address configured: the health endpoints are served there", file.display());
            };
            (addr.to_string(), addr.to_string(), path.to_string())
        }
    };
    let addrs: Vec<SocketAddr> =
        addr_text.to_socket_addrs().with_context(|| format!("{addr_text}: not an address (host:port)"))?.collect();
    let Some(addr) = addrs.first() else { bail!("{addr_text}: no address") };
    let (status, body) = get(addr, &host, &path).with_context(|| format!("unhealthy: GET http://{host}{path}"))?;
    let summary = summarize(&body);
    if status == 200 {
        println!("healthy: http://{host}{path} answered 200: {summary}");
        Ok(())
    } else {
        bail!("unhealthy: http://{host}{path} answered {status}: {summary}")
    }
}

/// One line for a body: `/readyz`'s problems (or "ready"), else the text itself.
fn summarize(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        if let Some(problems) = v.get("problems").and_then(|p| p.as_array()) {
            let texts: Vec<&str> = problems.iter().filter_map(|p| p.as_str()).collect();
            return if texts.is_empty() { "ready".to_string() } else { texts.join("; ") };
        }
    }
    body.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(512).collect()
}

/// One HTTP/1.1 GET with `Connection: close`; the status code and the body (lossy UTF-8).
fn get(addr: &SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(addr, TIMEOUT).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: migtun-healthcheck\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw).context("read the answer")?;
    parse(&raw)
}

/// The status code and body of an HTTP/1.1 answer (hyper's, with Content-Length, no chunking).
fn parse(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP answer (no end of headers)")?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else { bail!("not an HTTP status line: {status_line:?}") };
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {status_line:?}");
    }
    let code: u16 = code.parse().with_context(|| format!("bad status code in {status_line:?}"))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body_and_refuses_what_is_not_http() {
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap(), (200, "ok\n".into()));
        assert_eq!(parse(b"HTTP/1.1 503 Service Unavailable\r\n\r\n{}").unwrap().0, 503);
        assert!(parse(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse(b"\xff\xfe\r\n\r\n").is_err());
        assert_eq!(summarize("{\"problems\": [\"draining: no new streams are accepted\", \"x\"]}"), "draining: no new streams are accepted; x");
        assert_eq!(summarize("{\"ready\": true, \"problems\": []}"), "ready");
        assert_eq!(summarize("ok\n"), "ok");
    }
}
