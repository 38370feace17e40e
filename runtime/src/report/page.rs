//! One self-contained HTML page of sections, tables and plots. Plots are SVG drawn by
//! `plotters` and inlined, with no script, style sheet or font loaded from anywhere: the page
//! opens from a file, offline, in any browser, and the browser draws the text.

use std::fmt::Write;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Plot colours, in the order series take them.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The colours plots draw data in, as SVG writes them (`#1F77B4`): what a check of a drawn
/// page looks for.
pub fn data_colours() -> impl Iterator<Item = String> {
    PALETTE
        .iter()
        .map(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2))
}

/// A plot's size in pixels.
const PLOT_PX: (u32, u32) = (760, 320);

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Points joined by straight lines.
    Line,
    /// Points alone (a few values, such as validation losses or checkpoints).
    Points,
    /// A value that holds until the next point (a degree, a generation).
    Steps,
}

/// One named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    pub fn new(name: impl Into<String>, style: Style, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points: points
                .into_iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
            style,
        }
    }
}

/// A plot: series against shared axes, with vertical marks (faults, say) labelled in its
/// legend, or horizontal bars.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    series: Vec<Series>,
    marks: Vec<(f64, String)>,
    bars: Vec<(String, f64)>,
}

impl Chart {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Chart {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series: Vec::new(),
            marks: Vec::new(),
            bars: Vec::new(),
        }
    }

    /// Adds a series; one without points is left out.
    pub fn series(mut self, s: Series) -> Chart {
        if !s.points.is_empty() {
            self.series.push(s);
        }
        self
    }

    /// A vertical line at `x`, named `label` (the same label is named once).
    pub fn mark(mut self, x: f64, label: impl Into<String>) -> Chart {
        if x.is_finite() {
            self.marks.push((x, label.into()));
        }
        self
    }

    /// Horizontal bars, one per (label, value), drawn instead of series.
    pub fn bars(mut self, bars: Vec<(String, f64)>) -> Chart {
        self.bars = bars.into_iter().filter(|(_, v)| v.is_finite()).collect();
        self
    }

    /// Whether it has anything to draw.
    pub fn has_data(&self) -> bool {
        !self.series.is_empty() || self.bars.iter().any(|(_, v)| *v > 0.0)
    }

    /// The points it draws: a series' points, or one per bar.
    pub fn points(&self) -> usize {
        self.series.iter().map(|s| s.points.len()).sum::<usize>() + self.bars.len()
    }

    /// The plot as an SVG document.
    pub fn svg(&self) -> Result<String, String> {
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, PLOT_PX).into_drawing_area();
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            if self.bars.is_empty() {
                self.draw_series(&root)
            } else {
                self.draw_bars(&root)
            }
            .map_err(|e| format!("plot {:?}: {e}", self.title))?;
            root.present().map_err(|e| e.to_string())?;
        }
        Ok(out)
    }

    fn draw_series(
        &self,
        root: &DrawingArea<SVGBackend<'_>, Shift>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let all = || self.series.iter().flat_map(|s| s.points.iter());
        let mut x = span(all().map(|p| p.0).chain(self.marks.iter().map(|m| m.0)));
        let mut y = span(all().map(|p| p.1));
        let steps = self.series.iter().any(|s| s.style == Style::Steps);
        if steps {
            // A value that holds runs to the right edge; leave it room to be seen. Its axis
            // starts at zero, so that a change reads at its true size.
            x.1 += (x.1 - x.0).max(1.0) * 0.02;
            y = (y.0.min(0.0), y.1 + 1.0);
        }
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x.0..x.1, pad(y))?;
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .light_line_style(RGBColor(238, 238, 238))
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .draw()?;
        for (i, s) in self.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let legend =
                move |(x, y): (i32, i32)| Rectangle::new([(x, y - 4), (x + 14, y + 4)], c.filled());
            match s.style {
                Style::Line => chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))?
                    .label(s.name.as_str())
                    .legend(legend),
                Style::Points => chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))?
                    .label(s.name.as_str())
                    .legend(legend),
                Style::Steps => {
                    let mut held = Vec::with_capacity(2 * s.points.len() + 1);
                    for (k, &(px, py)) in s.points.iter().enumerate() {
                        if k > 0 {
                            held.push((px, s.points[k - 1].1));
                        }
                        held.push((px, py));
                    }
                    if let Some(&(_, last)) = s.points.last() {
                        held.push((x.1, last));
                    }
                    chart
                        .draw_series(LineSeries::new(held, c.stroke_width(2)))?
                        .label(s.name.as_str())
                        .legend(legend)
                }
            };
        }
        let mut named = Vec::new();
        let std::ops::Range { start: y0, end: y1 } = pad(y);
        for (mx, label) in &self.marks {
            let (k, first) = match named.iter().position(|n| n == label) {
                Some(k) => (k, false),
                None => {
                    named.push(label.clone());
                    (named.len() - 1, true)
                }
            };
            let c = PALETTE[(self.series.len() + k) % PALETTE.len()];
            let line = LineSeries::new([(*mx, y0), (*mx, y1)], c.stroke_width(1));
            let drawn = chart.draw_series(line)?;
            if first {
                drawn.label(label.as_str()).legend(move |(x, y)| {
                    PathElement::new([(x, y - 6), (x, y + 6)], c.stroke_width(2))
                });
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    }

    fn draw_bars(
        &self,
        root: &DrawingArea<SVGBackend<'_>, Shift>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let n = self.bars.len();
        let top = self.bars.iter().map(|b| b.1).fold(0.0f64, f64::max);
        // Room on the right for the label of the longest bar.
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(12)
            .build_cartesian_2d(0.0..top.max(1e-9) * 1.6, 0.0..n as f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc(self.x_label.as_str())
            .light_line_style(RGBColor(238, 238, 238))
            .x_label_formatter(&|v| short(*v))
            .draw()?;
        let row = |k: usize| (n - 1 - k) as f64;
        chart.draw_series(self.bars.iter().enumerate().map(|(k, (_, v))| {
            let c = PALETTE[k % PALETTE.len()];
            Rectangle::new([(0.0, row(k) + 0.15), (*v, row(k) + 0.85)], c.filled())
        }))?;
        // Each bar's name and value just past its end.
        let font = ("sans-serif", 13).into_font().color(&BLACK);
        chart.draw_series(self.bars.iter().enumerate().map(|(k, (label, v))| {
            Text::new(
                format!("{label}: {}", short(*v)),
                (*v + top * 0.01, row(k) + 0.62),
                font.clone(),
            )
        }))?;
        Ok(())
    }
}

/// The least and greatest of `values`, (0, 1) when there are none.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

/// A range around `(lo, hi)` with a margin, and of some width when they are equal.
fn pad((lo, hi): (f64, f64)) -> std::ops::Range<f64> {
    let m = ((hi - lo) * 0.06).max(hi.abs().max(1.0) * 1e-3);
    lo - m..hi + m
}

/// An axis label: short, without float noise.
fn short(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(format!("{:.3}", v / 1e6)))
    } else if a >= 1e4 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if a >= 10.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

/// Text made safe inside HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A page being built: a title, then sections of text, tables and plots.
#[derive(Debug, Default)]
pub struct Page {
    title: String,
    body: String,
    plots: usize,
}

impl Page {
    pub fn new(title: &str) -> Page {
        Page {
            title: title.into(),
            ..Page::default()
        }
    }

    pub fn heading(&mut self, text: &str) -> &mut Page {
        let _ = writeln!(self.body, "<h2>{}</h2>", escape(text));
        self
    }

    pub fn paragraph(&mut self, text: &str) -> &mut Page {
        let _ = writeln!(self.body, "<p>{}</p>", escape(text));
        self
    }

    /// A table: `head` names the columns (none: no header row), each row has as many cells.
    pub fn table(&mut self, head: &[&str], rows: &[Vec<String>]) -> &mut Page {
        self.body.push_str("<table>\n");
        if !head.is_empty() {
            self.body.push_str("<tr>");
            for h in head {
                let _ = write!(self.body, "<th>{}</th>", escape(h));
            }
            self.body.push_str("</tr>\n");
        }
        for r in rows {
            self.body.push_str("<tr>");
            for c in r {
                let _ = write!(self.body, "<td>{}</td>", escape(c));
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</table>\n");
        self
    }

    /// A list of links: (text, address) pairs, addresses relative to the page or absolute.
    pub fn links(&mut self, links: &[(String, String)]) -> &mut Page {
        self.body.push_str("<ul>\n");
        for (text, href) in links {
            let _ = writeln!(
                self.body,
                "<li><a href=\"{}\">{}</a></li>",
                escape(href),
                escape(text)
            );
        }
        self.body.push_str("</ul>\n");
        self
    }

    /// A plot; one with no data becomes a line saying so (`none`), so that every plot on the
    /// page has points.
    pub fn chart(&mut self, chart: &Chart, none: &str) -> Result<&mut Page, String> {
        if !chart.has_data() {
            let _ = writeln!(
                self.body,
                "<p class=\"none\">{}: {}</p>",
                escape(&chart.title),
                escape(none)
            );
            return Ok(self);
        }
        self.plots += 1;
        let _ = writeln!(
            self.body,
            "<figure class=\"plot\" id=\"plot-{}\" data-points=\"{}\">\n<figcaption>{}</figcaption>\n{}\n</figure>",
            self.plots,
            chart.points(),
            escape(&chart.title),
            chart.svg()?
        );
        Ok(self)
    }

    /// How many plots the page holds.
    pub fn plots(&self) -> usize {
        self.plots
    }

    /// The whole page.
    pub fn html(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>{title}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n\
             <h1>{title}</h1>\n{body}</body>\n</html>\n",
            title = escape(&self.title),
            body = self.body
        )
    }
}

const STYLE: &str = "body { font-family: sans-serif; max-width: 820px; margin: 2em auto; \
color: #222; }\nh1 { font-size: 1.5em; }\nh2 { font-size: 1.2em; margin-top: 1.6em; \
border-bottom: 1px solid #ddd; }\ntable { border-collapse: collapse; margin: 0.6em 0; }\n\
th, td { text-align: left; padding: 2px 12px 2px 0; font-size: 0.92em; }\n\
th { border-bottom: 1px solid #ccc; }\nfigure { margin: 1em 0; }\n\
figcaption { font-weight: bold; margin-bottom: 4px; }\n.none { color: #777; }\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_its_points_and_a_page_holds_it() {
        let chart = Chart::new("loss", "step", "loss")
            .series(Series::new(
                "train",
                Style::Line,
                vec![(1.0, 4.0), (2.0, 3.5), (3.0, 3.2)],
            ))
            .series(Series::new("val", Style::Points, vec![(3.0, 3.4)]))
            .mark(2.0, "fault");
        let svg = chart.svg().expect("svg");
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(svg.contains("<circle"), "{svg}");
        let mut page = Page::new("run <x>");
        page.chart(&chart, "none").expect("chart");
        page.chart(&Chart::new("empty", "x", "y"), "no data here")
            .expect("chart");
        let html = page.html();
        assert_eq!(page.plots(), 1);
        assert!(html.contains("run &lt;x&gt;"));
        assert!(html.contains("data-points=\"4\""), "{html}");
        assert!(html.contains("empty: no data here"));
    }

    #[test]
    fn bars_draw_one_rectangle_each() {
        let chart = Chart::new("goodput", "seconds", "")
            .bars(vec![("training".into(), 10.0), ("checkpoint".into(), 1.0)]);
        assert!(chart.has_data());
        let svg = chart.svg().expect("svg");
        assert!(svg.matches("<rect").count() >= 3, "{svg}");
        assert!(
            svg.contains("training") && svg.contains("checkpoint"),
            "{svg}"
        );
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(short(2_500_000.0), "2.5M");
        assert_eq!(short(12_000.0), "12k");
        assert_eq!(short(3.0), "3");
        assert_eq!(short(0.125), "0.125");
        assert_eq!(short(0.1000001), "0.1");
    }
}
