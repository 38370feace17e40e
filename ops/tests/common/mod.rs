//! Helpers shared by the `marathon` binary's tests.

pub use marathon_testkit::repo;

/// Whether process `pid` is still running (a zombie awaiting its reaper counts as gone).
pub use marathon_chaos::servers::running;

/// Each non-empty line of `text` (a process's logs under `--log-format json`) as the JSON
/// object it must be.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{text}")))
        .collect()
}

/// The first of `lines` whose string field `key` satisfies `ok`; `text` is shown when none does.
pub fn line_with<'a>(
    lines: &'a [serde_json::Value],
    key: &str,
    ok: impl Fn(&str) -> bool,
    text: &str,
) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l[key].as_str().is_some_and(&ok))
        .unwrap_or_else(|| panic!("no line whose {key} is as expected:\n{text}"))
}
