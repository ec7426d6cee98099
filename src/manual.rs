//! Shell completions and man pages, generated from the CLI definition the binary parses with
//! (so they never drift from the flags, the `SPARK_*` variables of `spark serve` included).
//!
//! Owns only the rendering; the definition is the binary's. Writes man pages atomically.

use std::path::PathBuf;

/// `spark completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `spark man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write `spark.1` and one `spark-<subcommand>.1` per subcommand into this directory,
    /// instead of printing `spark.1`
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Prints the completion script for `a.shell` to stdout (rendered first: the generator panics
/// on a failed write, `print!`'s failures are handled by the binary).
pub fn completions(a: &CompletionsArgs, mut cmd: clap::Command) {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, name, &mut script);
    print!("{}", String::from_utf8_lossy(&script));
}

/// Every page: `(file name, roff text)`, the top one first, then each subcommand's, nested
/// ones named `spark-profile-merge.1` and so on.
pub fn pages(cmd: clap::Command) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    fn walk(
        cmd: &clap::Command,
        name: String,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> std::io::Result<()> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.clone())).render(&mut page)?;
        out.push((format!("{name}.1"), page));
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, format!("{name}-{}", sub.get_name()), out)?;
        }
        Ok(())
    }
    let mut cmd = cmd;
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    walk(&cmd, name, &mut out)?;
    Ok(out)
}

/// Prints the top man page, or writes every page into `a.out_dir`.
pub fn man(a: &ManArgs, cmd: clap::Command) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let pages = pages(cmd).context("render the man pages")?;
    match &a.out_dir {
        None => print!("{}", String::from_utf8_lossy(&pages[0].1)),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            for (name, text) in &pages {
                let path = dir.join(name);
                crate::atomic_file::write_atomic_with(
                    &path,
                    text,
                    crate::atomic_file::Mode::Public,
                )
                .with_context(|| format!("write {}", path.display()))?;
            }
            println!("wrote {} man pages into {}", pages.len(), dir.display());
        }
    }
    Ok(())
}
