//! Progress bars for the long steps (loading, evaluating, compressing). Drawn on stderr only
//! when asked for — the CLI asks when stdout is a terminal — and hidden otherwise, so pipelines
//! and `--json` output stay clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Progress {
    enabled: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress { enabled }
    }

    /// A bar counting `len` items (samples).
    pub fn bar(&self, len: u64, msg: &str) -> ProgressBar {
        self.styled(len, msg, "{msg:>24} [{bar:40}] {pos}/{len} ({elapsed})")
    }

    /// A bar counting `len` bytes.
    pub fn bytes(&self, len: u64, msg: &str) -> ProgressBar {
        self.styled(
            len,
            msg,
            "{msg:>24} [{bar:40}] {bytes}/{total_bytes} ({elapsed})",
        )
    }

    /// A spinner for a step of unknown length.
    pub fn spinner(&self, msg: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new_spinner().with_message(msg.to_string());
        pb.enable_steady_tick(Duration::from_millis(100));
        pb
    }

    fn styled(&self, len: u64, msg: &str, template: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let style = ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> ");
        ProgressBar::new(len)
            .with_style(style)
            .with_message(msg.to_string())
    }
}
