//! The `key=value,...` checker of the allow-list: what a key of an option may hold ([`Kind`]),
//! and one option's value checked key by key against the keys of its driver.

use super::{cookie, opts, shorten, Ctx, Refusal};

#[derive(Clone, Copy)]
pub(super) enum Kind {
    /// Any printable text that is not a path.
    Text,
    /// A QEMU identifier (a reference to another node, device or object).
    Id,
    /// A file the guest opens (see [`Ctx::file`]).
    File,
    /// File-backed RAM, moved to the image directory.
    MemPath,
    OneOf(&'static [&'static str]),
}

/// Keys allowed for one option or driver.
pub(super) type Keys = &'static [(&'static str, Kind)];

pub(super) use Kind::{File, Id, MemPath, OneOf, Text};



pub(super) fn check_value(ctx: &mut Ctx, opt: &str, key: &str, kind: Kind, value: &str) -> Result<String, Refusal> {
    let bad = |why: String| Refusal::option(opt, format!("{key}={:?}: {why}", shorten(value)));
    match kind {
        Kind::Text if value.starts_with('/') => Err(bad("a path is not allowed here".into())),
        Kind::Text if value.chars().any(char::is_control) => Err(bad("control characters".into())),
        Kind::Text => Ok(value.to_string()),
        Kind::Id if cookie::is_identifier(value) => Ok(value.to_string()),
        Kind::Id => Err(bad("not a QEMU identifier".into())),
        Kind::OneOf(set) if set.contains(&value) => Ok(value.to_string()),
        Kind::OneOf(set) => Err(bad(format!("allowed: {}", set.join(", ")))),
        Kind::File => ctx.file(value).map_err(bad),
        Kind::MemPath => ctx.mem_path(value).map_err(bad),
    }
}

/// Checks `value` as `key=value,...` against `keys`; a bare first part is the `implied` key.
pub(super) fn keyed(ctx: &mut Ctx, opt: &str, value: &str, implied: Option<&str>, keys: &[(&str, Kind)]) -> Result<String, Refusal> {
    let mut parts = opts::parse(value);
    for (n, p) in parts.iter_mut().enumerate() {
        let key = match (&p.key, n, implied) {
            (Some(k), _, _) => k.clone(),
            (None, 0, Some(k)) => {
                p.key = Some(k.to_string());
                k.to_string()
            }
            // `key` alone is QemuOpts' `key=on`.
            (None, _, _) => {
                let k = std::mem::replace(&mut p.value, "on".into());
                p.key = Some(k.clone());
                k
            }
        };
        let Some(&(_, kind)) = keys.iter().find(|(k, _)| *k == key) else {
            let allowed = keys.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ");
            return Err(Refusal::option(opt, format!("key {:?} is not allowed (allowed: {allowed})", shorten(&key))));
        };
        p.value = check_value(ctx, opt, &key, kind, &p.value)?;
    }
    Ok(opts::render(&parts))
}

/// For options whose keys depend on a driver: finds it (`driver_key`, or the bare first part),
/// names the refusal after it, and checks the rest against its keys.
pub(super) fn with_driver(
    ctx: &mut Ctx,
    opt: &str,
    value: &str,
    driver_key: &str,
    drivers: &[(&str, Keys)],
    refused: &[(&str, &str)],
) -> Result<String, Refusal> {
    if value.trim_start().starts_with('{') {
        return Err(Refusal::option(opt, "the JSON form is not supported; use key=value"));
    }
    let parts = opts::parse(value);
    let driver = parts
        .iter()
        .enumerate()
        .find_map(|(n, p)| match &p.key {
            Some(k) if k == driver_key => Some(p.value.clone()),
            None if n == 0 => Some(p.value.clone()),
            _ => None,
        })
        .ok_or_else(|| Refusal::option(opt, format!("no {driver_key}")))?;
    let named = format!("{opt} {}", shorten(&driver));
    if let Some((_, why)) = refused.iter().find(|(prefix, _)| driver.starts_with(prefix)) {
        return Err(Refusal::option(&named, *why));
    }
    let Some((_, keys)) = drivers.iter().find(|(d, _)| *d == driver) else {
        let allowed = drivers.iter().map(|(d, _)| *d).collect::<Vec<_>>().join(", ");
        return Err(Refusal::option(&named, format!("{driver_key} {driver:?} is not allowed (allowed: {allowed})")));
    };
    let mut all: Vec<(&str, Kind)> = vec![(driver_key, Text)];
    all.extend_from_slice(keys);
    keyed(ctx, &named, value, Some(driver_key), &all)
}

