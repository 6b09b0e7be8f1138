//! What a long-running command (`seed`) shows while it works: a progress bar per image on a
//! terminal, plain lines otherwise, so logs of a CI job or a cron run stay readable and
//! greppable. Results go to stdout, failures to stderr; on a terminal both go through the
//! bars' own printer so they do not tear the bars.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub enum Progress {
    /// indicatif bars on stderr.
    Bars(MultiProgress),
    /// One line per finished item.
    Lines,
}

impl Progress {
    /// Bars if `terminal`, else plain lines.
    pub fn new(terminal: bool) -> Progress {
        if terminal {
            Progress::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Progress::Lines
        }
    }

    /// A byte-counting bar for one item; a hidden one (whose updates cost nothing) when
    /// printing plain lines.
    pub fn bar(&self, name: &str, total: u64) -> ProgressBar {
        match self {
            Progress::Bars(multi) => {
                let style = ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                let bar = multi.add(ProgressBar::new(total).with_style(style));
                bar.set_prefix(name.to_owned());
                bar
            }
            Progress::Lines => ProgressBar::hidden(),
        }
    }

    /// Reports a finished item (stdout when printing lines).
    pub fn done(&self, line: &str) {
        match self {
            Progress::Bars(multi) => {
                let _ = multi.println(line);
            }
            Progress::Lines => println!("{line}"),
        }
    }

    /// Reports a failed item (stderr when printing lines).
    pub fn failed(&self, line: &str) {
        match self {
            Progress::Bars(multi) => {
                let _ = multi.println(line);
            }
            Progress::Lines => eprintln!("{line}"),
        }
    }
}
