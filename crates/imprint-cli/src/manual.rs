//! `imprint man` and `imprint completions SHELL`: the man pages and shell completions,
//! generated from the same argument definitions the binary parses (so they cannot drift from
//! `--help`). scripts/release packages their output; users who install with cargo run them.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Shells `imprint completions` writes for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    /// bash (bash-completion: /usr/share/bash-completion/completions/imprint).
    Bash,
    /// zsh (a `_imprint` file in a folder of $fpath).
    Zsh,
    /// fish (~/.config/fish/completions/imprint.fish).
    Fish,
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(
    mut cmd: clap::Command,
    shell: CompletionShell,
    out: &mut dyn Write,
) -> Result<()> {
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    emit(out, &script).context("writing the completion script")
}

/// Writes `bytes` to `out`; a reader that stopped early (`imprint man | head`) is not an error.
fn emit(out: &mut dyn Write, bytes: &[u8]) -> std::io::Result<()> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Without `dir`: the main page (imprint.1) on `out`. With `dir`: imprint.1 and one page per
/// subcommand (imprint-build.1, …) written into `dir`, their names listed on `out`.
pub fn man(cmd: clap::Command, dir: Option<&Path>, out: &mut dyn Write) -> Result<()> {
    match dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .context("rendering the man page")?;
            emit(out, &page).context("writing the man page")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut cmd = cmd.disable_help_subcommand(true);
            cmd.build();
            let mut pages = vec![cmd.clone()];
            pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
            for page in pages {
                let man = clap_mangen::Man::new(page);
                let path = dir.join(man.get_filename());
                let mut bytes = Vec::new();
                man.render(&mut bytes).context("rendering a man page")?;
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                emit(out, format!("{}\n", path.display()).as_bytes())
                    .context("listing the man pages")?;
            }
        }
    }
    Ok(())
}
