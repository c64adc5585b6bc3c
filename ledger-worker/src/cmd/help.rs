//! The command tree as `--help` shows it: the global options are listed once, in the
//! top-level help, instead of in every subcommand's. They are still accepted anywhere
//! on the line (`ledger-worker account show 117 --json`).

use clap::{Arg, Command, CommandFactory};

/// What every subcommand's help says about the options it hides.
const GLOBALS_NOTE: &str =
    "Global options (--database-url, --json, --log-format) go before or after the command: see the top-level --help.";

/// `C`'s command tree with the global options shown once. Clap copies a global option
/// into each subcommand unless the subcommand has one of that name already, so each
/// subcommand gets a hidden copy first: parsed the same, shown only at the top.
pub fn command<C: CommandFactory>() -> Command {
    let root = C::command();
    let globals: Vec<Arg> = root.get_arguments().filter(|a| a.is_global_set()).cloned().collect();
    if globals.is_empty() {
        return root;
    }
    root.mut_subcommands(|sub| hide_globals(sub, &globals))
}

fn hide_globals(mut sub: Command, globals: &[Arg]) -> Command {
    for arg in globals {
        sub = sub.arg(arg.clone().hide(true));
    }
    sub.after_help(GLOBALS_NOTE).mut_subcommands(|s| hide_globals(s, globals))
}

/// Every argument in the tree that has no description, as "command path: --name".
pub fn undocumented(cmd: &Command) -> Vec<String> {
    let mut missing = Vec::new();
    walk(cmd, cmd.get_name(), &mut missing);
    missing
}

fn walk(cmd: &Command, path: &str, missing: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let generated = matches!(arg.get_id().as_str(), "help" | "version");
        let described = arg.get_help().is_some_and(|h| !h.to_string().trim().is_empty());
        if !generated && !described {
            missing.push(format!("{path}: {}", arg.get_id()));
        }
    }
    for sub in cmd.get_subcommands() {
        walk(sub, &format!("{path} {}", sub.get_name()), missing);
    }
}
