//! Progress output for long runs: a bar on a terminal, a line per tenth otherwise.

use std::io::Write;
use std::time::Duration;

/// A progress bar on a terminal; on a pipe or file, a line at every tenth.
pub struct Progress {
    total: usize,
    tty: bool,
    last_tenth: usize,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        use std::io::IsTerminal;
        Progress { total, tty: std::io::stderr().is_terminal(), last_tenth: 0 }
    }

    pub fn show(&mut self, done: usize, elapsed: Duration) {
        const WIDTH: usize = 40;
        if self.tty {
            let filled = (done * WIDTH).checked_div(self.total).unwrap_or(WIDTH).min(WIDTH);
            eprint!(
                "\r   [{}{}] {done}/{} {:.1}s",
                "#".repeat(filled),
                "-".repeat(WIDTH - filled),
                self.total,
                elapsed.as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        } else {
            let tenth = (done * 10).checked_div(self.total).unwrap_or(10);
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!("   {done}/{} processed ({:.1}s)", self.total, elapsed.as_secs_f64());
            }
        }
    }

    pub fn finish(&mut self, done: usize, elapsed: Duration) {
        self.show(done, elapsed);
        if self.tty {
            eprintln!();
        }
    }
}
