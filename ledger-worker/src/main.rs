//! `ledger-worker`: see `ledger-worker --help`.

fn main() -> std::process::ExitCode {
    ledger_worker::cmd::main()
}
