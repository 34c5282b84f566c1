//! QEMU's `key=value,key=value` option syntax (QemuOpts / keyval): parsed into parts and
//! written back, with QEMU's escape for a comma inside a value (`,,`).
//!
//! Parsing and re-writing (rather than passing the source's text through) means the builder
//! sees exactly the keys QEMU will see: a value cannot smuggle in another key.

/// One `key=value` (or a bare `value`: the option's implied key, or a boolean `key` = on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub key: Option<String>,
    pub value: String,
}

/// Splits an option value at unescaped commas; `,,` is a literal comma.
pub fn parse(text: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    loop {
        match chars.next() {
            Some(',') if chars.peek() == Some(&',') => {
                chars.next();
                cur.push(',');
            }
            Some(',') => parts.push(part(std::mem::take(&mut cur))),
            Some(c) => cur.push(c),
            None => {
                parts.push(part(cur));
                return parts;
            }
        }
    }
}

fn part(s: String) -> Part {
    // A key never contains '=' or ','; the value is everything after the first '='.
    match s.split_once('=') {
        Some((k, v)) => Part { key: Some(k.to_string()), value: v.to_string() },
        None => Part { key: None, value: s },
    }
}

/// Writes parts back in QEMU's syntax.
pub fn render(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|p| match &p.key {
            Some(k) => format!("{k}={}", escape(&p.value)),
            None => escape(&p.value),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Doubles commas, so a value (a path from the config, say) stays one value.
pub fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_are_escaped_both_ways() {
        let p = parse("driver=file,filename=/a,,b,node-name=f0");
        assert_eq!(p.len(), 3);
        assert_eq!(p[1], Part { key: Some("filename".into()), value: "/a,b".into() });
        assert_eq!(render(&p), "driver=file,filename=/a,,b,node-name=f0");
    }

    #[test]
    fn bare_values_have_no_key() {
        let p = parse("pc,memory-backend=ram0");
        assert_eq!(p[0], Part { key: None, value: "pc".into() });
        assert_eq!(p[1].key.as_deref(), Some("memory-backend"));
    }
}
