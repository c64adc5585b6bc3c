//! `--help` is complete: every option and argument of every command has a description,
//! `--status` lists its values, and the global options are shown once, at the top.

use super::*;
use ledger_worker::cmd::{help, Cli};

#[test]
fn no_argument_of_any_command_is_undocumented() {
    let tree = help::command::<Cli>();
    assert_eq!(help::undocumented(&tree), Vec::<String>::new());
    // The walk sees what it should: a command's own options and positional arguments.
    let withdraw = tree.find_subcommand("withdraw").unwrap();
    let ids: Vec<&str> = withdraw.get_arguments().map(|a| a.get_id().as_str()).collect();
    assert!(["account", "to", "amount", "key"].iter().all(|id| ids.contains(id)), "{ids:?}");
    // And it would catch one left bare.
    let bare = clap::Command::new("t").subcommand(clap::Command::new("s").arg(clap::Arg::new("x").long("x")));
    assert_eq!(help::undocumented(&bare), vec!["t s: x".to_string()]);
}

fn help_of(args: &[&str]) -> String {
    let out = worker_command().args(args).arg("--help").stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn help_lists_status_values_and_shows_global_options_once() {
    let top = help_of(&[]);
    for global in ["--database-url", "--json", "--log-format", "Exit status"] {
        assert!(top.contains(global), "top-level help documents {global}: {top}");
    }
    let list = help_of(&["withdrawal", "list"]);
    assert!(list.contains("pending, paying_out, completed, rejected, failed, returned"), "{list}");
    assert!(help_of(&["payout", "list"]).contains("[possible values: pending, settled, returned, failed]"));
    for command in [&["account", "open"][..], &["deposit"], &["transfer"], &["withdrawal", "list"], &["run"]] {
        let text = help_of(command);
        assert!(!text.contains("--database-url <") && !text.contains("--log-format <"), "{command:?}: {text}");
        assert!(text.contains("see the top-level --help"), "{command:?}: {text}");
    }
    // Still accepted after the command.
    let out = worker_command().args(["account", "show", "1", "--json", "--database-url", ""]).output().unwrap();
    assert_eq!(json_lines(&out.stderr)[0]["kind"], "usage", "an empty URL is a usage error");
}
