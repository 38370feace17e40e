//! Run reports: one self-contained HTML page with SVG plots, written beside a run's metrics at
//! its end and by `marathon report`. [`page`] builds pages (the chaos suite's reports use it
//! too); [`run`] draws a run from its metrics file.

pub mod page;
pub mod run;

pub use page::{Chart, Page, Series, Style};
pub use run::{report_path, write_run_report, RunMetrics, Timeline};
