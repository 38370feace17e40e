//! A real headless browser (Debian's `chromium`) loading a report page: what its console
//! printed, the document it built, and a screenshot, and the checks a report must pass in it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Chromium: `MARATHON_CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
pub fn chromium_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MARATHON_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
        .context(
            "chromium is not installed: the report tests load the page in a real headless \
             browser; run scripts/setup.sh --test-servers (it runs `apt-get install chromium`), \
             or set MARATHON_CHROMIUM to a chromium binary",
        )
}

/// What the browser made of a page.
#[derive(Debug)]
pub struct Loaded {
    /// Every message the page's console printed (errors, warnings, logs, uncaught exceptions).
    pub console: Vec<String>,
    /// The document as the browser parsed it.
    pub dom: String,
    /// The screenshot's pixels, RGBA, and its size.
    pub pixels: Vec<u8>,
    pub size: (u32, u32),
}

/// The page's size in the browser: wide enough for a report's plots, tall enough for all of
/// them.
const WINDOW: (u32, u32) = (1000, 9000);

fn chromium(bin: &Path, profile: &Path, args: &[String]) -> Result<std::process::Output> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let pid = child.id();
    // A browser that hangs is killed rather than holding the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(90)).is_err() {
            // SAFETY: kill(2) on the browser's pid, which this function still waits on.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output()?;
    let _ = tx.send(());
    Ok(out)
}

/// Loads `page` in headless Chromium twice: once for the document (and its console), once for a
/// screenshot.
pub fn load(page: &Path) -> Result<Loaded> {
    let bin = chromium_binary()?;
    let page = page
        .canonicalize()
        .with_context(|| format!("{}: the page to load", page.display()))?;
    let url = format!("file://{}", page.display());
    let scratch = tempfile::tempdir()?;
    let window = format!("--window-size={},{}", WINDOW.0, WINDOW.1);
    let out = chromium(
        &bin,
        &scratch.path().join("a"),
        &[window.clone(), "--dump-dom".into(), url.clone()],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "chromium --dump-dom {url} failed ({}): {stderr}",
            out.status
        );
    }
    // Chromium logs each console message, and each uncaught exception, as a CONSOLE line.
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    let shot = scratch.path().join("shot.png");
    let out = chromium(
        &bin,
        &scratch.path().join("b"),
        &[
            window,
            format!("--screenshot={}", shot.display()),
            url.clone(),
        ],
    )?;
    if !out.status.success() || !shot.is_file() {
        bail!(
            "chromium --screenshot {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot)?));
    let mut reader = decoder.read_info().context("the screenshot is not a PNG")?;
    let mut buf = vec![0; reader.output_buffer_size().context("screenshot size")?];
    let info = reader
        .next_frame(&mut buf)
        .context("decode the screenshot")?;
    buf.truncate(info.buffer_size());
    let pixels = match info.color_type {
        png::ColorType::Rgba => buf,
        png::ColorType::Rgb => buf
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => bail!("screenshot in {other:?}, not RGB"),
    };
    Ok(Loaded {
        console,
        dom,
        pixels,
        size: (info.width, info.height),
    })
}

/// The value of attribute `name` in the tag `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    tag[at..].split('"').next()
}

/// The data points one plot's SVG draws: the points of its coloured lines, its coloured dots,
/// and its coloured bars (a legend's swatches are smaller than a bar and not counted).
pub fn data_points(svg: &str) -> usize {
    let colours: Vec<String> = marathon_runtime::report::page::data_colours().collect();
    let coloured =
        |c: Option<&str>| c.is_some_and(|c| colours.iter().any(|k| k.eq_ignore_ascii_case(c)));
    let mut n = 0;
    for tag in svg.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap_or("");
        if tag.starts_with("polyline") && coloured(attr(tag, "stroke")) {
            n += attr(tag, "points").map_or(0, |p| p.split_whitespace().count());
        } else if tag.starts_with("circle") && coloured(attr(tag, "fill")) {
            n += 1;
        } else if tag.starts_with("rect") && coloured(attr(tag, "fill")) {
            let px = |k| {
                attr(tag, k)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if px("height") > 10.0 && px("width") > 0.0 {
                n += 1;
            }
        }
    }
    n
}

/// What is wrong with a report page as the browser loaded it: console messages, a plot that
/// draws no data, a blank screenshot, fewer plots than `plots_min`. Empty when it is fine.
pub fn check_report(loaded: &Loaded, plots_min: usize) -> Vec<String> {
    let mut v: Vec<String> = loaded
        .console
        .iter()
        .map(|l| format!("console: {l}"))
        .collect();
    let figures: Vec<&str> = loaded
        .dom
        .split("<figure class=\"plot\"")
        .skip(1)
        .map(|f| f.split("</figure>").next().unwrap_or(""))
        .collect();
    if figures.len() < plots_min {
        v.push(format!(
            "{} plots in the page, fewer than {plots_min}",
            figures.len()
        ));
    }
    for (i, f) in figures.iter().enumerate() {
        let title = f
            .split("<figcaption>")
            .nth(1)
            .and_then(|t| t.split("</figcaption>").next())
            .unwrap_or("?");
        if !f.contains("<svg") {
            v.push(format!("plot {} ({title}): no SVG in the document", i + 1));
        } else if data_points(f) == 0 {
            v.push(format!("plot {} ({title}): draws no data points", i + 1));
        }
    }
    let (w, h) = loaded.size;
    let px = loaded.pixels.chunks_exact(4);
    let total = (w as usize * h as usize).max(1);
    let inked = px
        .clone()
        .filter(|p| p[0] < 235 || p[1] < 235 || p[2] < 235)
        .count();
    // Blue: the first series' colour, drawn in every plot with a series.
    let blue = px
        .filter(|p| p[2] > 150 && p[0] < 80 && p[1] > 90 && p[1] < 150)
        .count();
    if inked * 1000 < total || (plots_min > 0 && blue == 0) {
        v.push(format!(
            "the screenshot ({w}x{h}) is blank: {inked} pixels not white, {blue} in the plots' \
             first colour"
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_points_count_coloured_marks_only() {
        let svg = "<svg><polyline stroke=\"#000000\" points=\"1,2 3,4 \"/>\
                   <polyline stroke=\"#1F77B4\" points=\"1,2 3,4 5,6 \"/>\
                   <circle fill=\"#FF7F0E\" r=\"3\"/>\
                   <rect fill=\"#2CA02C\" width=\"14\" height=\"8\"/>\
                   <rect fill=\"#2CA02C\" width=\"140\" height=\"18\"/></svg>";
        assert_eq!(data_points(svg), 3 + 1 + 1);
        assert_eq!(
            data_points("<svg><polyline stroke=\"#000000\" points=\"1,2 3,4\"/></svg>"),
            0
        );
    }
}
