//! `migtun certs init|issue|revoke`.

use std::path::Path;

pub fn init(dir: &Path) -> anyhow::Result<()> {
    migtun_certs::init(dir)?;
    println!("new CA: {0}/ca.pem (certificate), {0}/ca.key (key, mode 0600)", dir.display());
    Ok(())
}

pub fn issue(dir: &Path, name: &str) -> anyhow::Result<()> {
    let (cert, key) = migtun_certs::issue(dir, name)?;
    println!("{name}: {} (certificate), {} (key, mode 0600)", cert.display(), key.display());
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
