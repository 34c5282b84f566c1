//! The TOML shape of a config file (every table denies unknown keys) and the parse that
//! turns serde's errors into one line naming the key and the line.

use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) name: String,
    pub(super) listen: String,
    pub(super) admin: Option<String>,
    pub(super) metrics: Option<String>,
    pub(super) drain_timeout_secs: Option<i64>,
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) peer: Vec<RawPeer>,
    #[serde(default)]
    pub(super) forward: Vec<RawForward>,
    #[serde(default)]
    pub(super) expose: Vec<RawExpose>,
    pub(super) qemu: Option<RawQemu>,
    pub(super) tunnels: Option<RawTunnels>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: String,
    pub(super) key: String,
    pub(super) ca: String,
    pub(super) record_layer: Option<String>,
    pub(super) crl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) name: String,
    pub(super) address: String,
    pub(super) transport: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForward {
    pub(super) listen: String,
    pub(super) peer: String,
    pub(super) route: String,
    /// A string ("0660"); an integer is caught to explain how to write it.
    pub(super) mode: Option<toml::Value>,
    /// A user name or a numeric uid.
    pub(super) owner: Option<toml::Value>,
    /// A group name or a numeric gid.
    pub(super) group: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExpose {
    pub(super) route: String,
    pub(super) target: String,
    pub(super) allow: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTunnels {
    pub(super) dir: String,
    pub(super) allow: Option<Vec<String>>,
    pub(super) max_open: Option<i64>,
    pub(super) max_ttl_secs: Option<i64>,
    pub(super) owner: Option<String>,
    /// A group name or a numeric gid.
    pub(super) group: Option<toml::Value>,
    /// A string ("0750"), as a forward's `mode`.
    pub(super) mode: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQemu {
    pub(super) run_dir: String,
    pub(super) state_dir: Option<String>,
    pub(super) image_dir: Option<String>,
    pub(super) prepare_hook: Option<String>,
    pub(super) emulator: Option<String>,
    pub(super) shared_storage: Option<Vec<String>>,
    pub(super) max_disk_bytes: Option<i64>,
    pub(super) run_as: Option<String>,
    pub(super) sandbox: Option<bool>,
    pub(super) allow_sources: Option<Vec<String>>,
    pub(super) max_incoming: Option<i64>,
    pub(super) max_incoming_per_peer: Option<i64>,
    pub(super) max_upload_bytes: Option<i64>,
}

pub(super) type Problem = (String, String);

pub(super) fn one_line(s: &str) -> String {
    let s = s.trim();
    if !s.contains(['\n', '\r']) {
        return s.to_string();
    }
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1-based line number of a byte offset.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(super) fn with_line(problem: String, text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => format!("{problem} (line {})", line_of(text, s.start)),
        None => problem,
    }
}

/// The keys of the top level, before any `[table]`.
pub(super) const TOP_LEVEL_KEYS: &[&str] = &["name", "listen", "admin", "metrics", "drain_timeout_secs"];

pub(super) fn parse(text: &str) -> Result<RawConfig, Problem> {
    // Syntax first, so that a syntax error is not mistaken for a problem with some key.
    if let Err(e) = text.parse::<toml::Table>() {
        let first = e
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_string();
        let key = e
            .span()
            .map(|s| key_at_line(text, line_of(text, s.start)))
            .unwrap_or_default();
        return Err((
            key,
            with_line(format!("TOML syntax error: {first}"), text, e.span()),
        ));
    }
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let mut key = render_path(e.path());
        let inner = e.inner();
        let full = inner.message();
        let msg = full.lines().next().unwrap_or("invalid value").to_string();
        // A quoted TOML key may hold a newline: the field's name is taken from the whole
        // message, not its first line.
        let problem = if let Some(rest) = full.strip_prefix("unknown field `") {
            // "unknown field `adress`, expected one of `name`, `address`, `transport`"
            let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
            if !key.ends_with(field) {
                key = join_key(&key, field);
            }
            let expected = expected.trim_start_matches(',').trim().replace('`', "");
            if key.contains('.') && TOP_LEVEL_KEYS.contains(&field) {
                // `admin = ...` appended at the end of the file lands in the last table.
                format!(
                    "unknown key: `{field}` is a top-level key, but in TOML every key after a [table] header belongs to that table; move it above the first [table]"
                )
            } else if expected.is_empty() {
                "unknown key".to_string()
            } else {
                format!("unknown key ({expected})")
            }
        } else if let Some(rest) = full.strip_prefix("missing field `") {
            let field = rest.split('`').next().unwrap_or(rest);
            key = join_key(&key, field);
            "missing key".to_string()
        } else if key.ends_with("mode") && msg.starts_with("invalid type") {
            format!("{msg}; write the mode as an octal string, e.g. mode = \"0660\"")
        } else {
            msg
        };
        (printable_key(&key), with_line(problem, text, inner.span()))
    })
}

/// A key as shown in an error: control characters (possible in quoted TOML keys) escaped, so
/// that the error stays one line.
pub(super) fn printable_key(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

pub(super) fn join_key(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

pub(super) fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// Best-effort key for a syntax error on `line` (1-based): the enclosing table header plus the
/// key written at the start of that line, e.g. `peer[1].address`.
pub(super) fn key_at_line(text: &str, line: usize) -> String {
    let mut table = String::new();
    let mut last_key: Option<String> = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        let is_error_line = i + 1 == line;
        if let Some(h) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let h = h.trim().to_string();
            let n = counts.entry(h.clone()).or_insert(0);
            table = format!("{h}[{n}]");
            *n += 1;
            if is_error_line {
                return table;
            }
        } else if let Some(h) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = h.trim().to_string();
            if is_error_line {
                return table;
            }
        } else {
            let k: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            let assigns = !k.is_empty() && l[k.len()..].trim_start().starts_with('=');
            if assigns {
                last_key = Some(join_key(&table, &k));
            }
            if is_error_line {
                // A line that assigns nothing continues the value of the last key (a
                // multi-line array or string); before any key it is the table's.
                return if assigns { join_key(&table, &k) } else { last_key.unwrap_or(table) };
            }
            continue;
        }
        last_key = None;
    }
    table
}
