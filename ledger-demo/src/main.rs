//! `ledger-demo`: see `ledger-demo --help`.

fn main() -> std::process::ExitCode {
    ledger_worker::cmd::main_with(ledger_demo::cmd::run)
}
