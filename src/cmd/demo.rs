pub fn run(_size_mib: u64) -> anyhow::Result<()> { anyhow::bail!("demo: not yet") }
