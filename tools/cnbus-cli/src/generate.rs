//! Shell completions and a man page, generated from a tool's `clap` definition: the hidden
//! subcommands `completions SHELL` and `man` (both print to stdout), so that a package or
//! an operator makes them from the installed binary:
//!
//! ```sh
//! proctrace completions bash > /usr/share/bash-completion/completions/proctrace
//! proctrace man > /usr/share/man/man1/proctrace.1
//! ```

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Command, Subcommand};
use clap_complete::Shell;

/// The hidden subcommands every tool has.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Generate {
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell)
    #[command(hide = true)]
    Completions {
        /// The shell
        shell: Shell,
    },
    /// Print the man page (roff)
    #[command(hide = true)]
    Man,
}

impl Generate {
    /// Writes what was asked for `cmd` (the tool's whole command, from
    /// `CommandFactory::command`) to `out`, and flushes it. A failed write (`> /dev/full`)
    /// is returned: the text is made in memory first, because `clap_complete` panics when
    /// its writer fails.
    pub fn write(&self, mut cmd: Command, out: &mut impl Write) -> io::Result<()> {
        let mut text = Vec::with_capacity(16 << 10);
        match self {
            Generate::Completions { shell } => {
                let name = cmd.get_name().to_string();
                clap_complete::generate(*shell, &mut cmd, name, &mut text);
            }
            Generate::Man => clap_mangen::Man::new(cmd).render(&mut text)?,
        }
        out.write_all(&text)?;
        out.flush()
    }

    /// Writes what was asked for `cmd` to stdout: the tool's exit status (0, or 1 with a
    /// message from `program` when the write fails; a closed pipe is a quiet 0, as
    /// [`write_failed`](crate::output::write_failed) says).
    pub fn run(&self, program: &str, cmd: Command) -> ExitCode {
        match self.write(cmd, &mut io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => crate::output::write_failed(program, self.what(), &e),
        }
    }

    /// What [`Generate::write`] writes, for a message about a failed write.
    pub fn what(&self) -> &'static str {
        match self {
            Generate::Completions { .. } => "the completion script to stdout",
            Generate::Man => "the man page to stdout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A tool with an option.
    #[derive(Parser)]
    #[command(name = "tool", version, args_conflicts_with_subcommands = true)]
    struct Cli {
        #[command(subcommand)]
        generate: Option<Generate>,
        /// Stop after SECS seconds
        #[arg(long, value_name = "SECS")]
        duration: Option<u32>,
    }

    #[test]
    fn completions_and_man_page() {
        let generated = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let mut out = Vec::new();
            cli.generate
                .unwrap()
                .write(Cli::command(), &mut out)
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        let text = generated(&["tool", "completions", "bash"]);
        assert!(text.contains("--duration"), "{text}");
        let text = generated(&["tool", "man"]);
        assert!(text.contains(".TH tool"), "{text}");
        assert!(text.contains("duration"), "{text}");
        assert!(Cli::try_parse_from(["tool", "completions", "tcsh"]).is_err());
    }

    /// A writer that is always full, like `/dev/full`.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(28))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Regression: `clap_complete::generate` panicked ("failed to write completion file")
    /// when its writer failed (`proctrace completions bash > /dev/full`).
    #[test]
    fn a_failed_write_is_an_error_not_a_panic() {
        for g in [
            Generate::Completions { shell: Shell::Bash },
            Generate::Completions { shell: Shell::Zsh },
            Generate::Man,
        ] {
            let e = g.write(Cli::command(), &mut Full).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(28), "{g:?}");
        }
    }
}
