//! `migtun certs init|issue|revoke`.

use std::path::Path;

pub fn init(dir: &Path) -> anyhow::Result<()> {
    migtun_certs::init(dir)?;
    println!("new CA: {0}/ca.pem (certificate), {0}/ca.key (key, mode 0600)", dir.display());
    Ok(())
}

pub fn issue(dir: &Path, name: &str, days: Option<u32>, ips: &[std::net::IpAddr], force: bool) -> anyhow::Result<()> {
    let mut opts = migtun_certs::IssueOptions { ips: ips.to_vec(), ..Default::default() };
    if let Some(d) = days {
        anyhow::ensure!(d > 0, "--days must be at least 1");
        opts.not_after = Some(migtun_certs::time::OffsetDateTime::now_utc() + migtun_certs::time::Duration::days(i64::from(d)));
    }
    let (cert, key) = migtun_certs::issue_with(dir, name, &opts, force)?;
    let days = days.map(i64::from).unwrap_or(migtun_certs::HOST_VALIDITY.whole_days());
    println!("{name}: {} (certificate, {days} days), {} (key, mode 0600)", cert.display(), key.display());
    Ok(())
}

pub fn revoke(dir: &Path, name: &str) -> anyhow::Result<()> {
    let crl = migtun_certs::revoke(dir, name)?;
    println!(
        "{name}: revoked in {} (copy it to every agent's tls.crl and restart them)",
        crl.display()
    );
    Ok(())
}
