//! Shell completions and a man page, generated from a tool's `clap` definition: the hidden
//! subcommands `completions SHELL` and `man` (both print to stdout), so that a package or
//! an operator makes them from the installed binary:
//!
//! ```sh
//! proctrace completions bash > /usr/share/bash-completion/completions/proctrace
//! proctrace man > /usr/share/man/man1/proctrace.1
//! ```

use std::io::{self, Write};

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
    /// `CommandFactory::command`) to `out`.
    pub fn write(&self, mut cmd: Command, out: &mut impl Write) -> io::Result<()> {
        match self {
            Generate::Completions { shell } => {
                let name = cmd.get_name().to_string();
                clap_complete::generate(*shell, &mut cmd, name, out);
                Ok(())
            }
            Generate::Man => clap_mangen::Man::new(cmd).render(out),
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
        let cli = Cli::try_parse_from(["tool", "completions", "bash"]).unwrap();
        let mut out = Vec::new();
        cli.generate
            .unwrap()
            .write(Cli::command(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("--duration"), "{text}");
        let cli = Cli::try_parse_from(["tool", "man"]).unwrap();
        let mut out = Vec::new();
        cli.generate
            .unwrap()
            .write(Cli::command(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH tool"), "{text}");
        assert!(text.contains("duration"), "{text}");
        assert!(Cli::try_parse_from(["tool", "completions", "tcsh"]).is_err());
    }
}
