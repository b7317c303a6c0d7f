//! The planner report's charts as standalone SVG documents, std only:
//! [`line_chart`] (e.g. throughput against batch size), [`heatmap`] (e.g. the
//! load of each expert in each layer) and [`stack`], which puts several charts
//! into one document.
//!
//! Every text goes through `escape` and every number through `num` or a
//! label formatter, so a NaN or an infinity in the input never reaches the
//! output: non-finite points are gaps, non-finite cells are grey.

/// One line of a [`line_chart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
/// Where both chart kinds draw their data; the right margin holds the legend
/// or the colour bar.
const PLOT: Area = Area {
    x: 70.0,
    y: 45.0,
    w: 420.0,
    h: 290.0,
};
/// At most this many intervals between ticks, which gives 4 to 6 ticks.
const MAX_INTERVALS: f64 = 5.0;
/// Okabe–Ito, which colour-blind readers can tell apart (its yellow is left
/// out: it vanishes on white).
const PALETTE: [&str; 7] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000",
];
/// ColorBrewer YlOrBr, light to dark. Luma falls from each stop to the next,
/// so along the whole scale a larger value is always a darker cell.
const SCALE: [[u8; 3]; 4] = [
    [0xff, 0xf7, 0xbc],
    [0xfe, 0xc4, 0x4f],
    [0xec, 0x70, 0x14],
    [0x8c, 0x2d, 0x04],
];
/// The fill of a cell whose value is NaN or infinite.
const MISSING: &str = "#bdbdbd";
/// Rectangles in the colour bar; no gradient, because its `id` would clash
/// when [`stack`] puts two heatmaps in one document.
const BAR_STEPS: usize = 32;

/// A line chart with markers: nice ticks on both axes, axis labels, a legend
/// naming each series and a title. Points with a non-finite coordinate are
/// left out and break the line. The y axis always includes 0.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let finite: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|&p| is_finite(p))
        .collect();
    let x = Ticks::new(extent(finite.iter().map(|p| p.0)).unwrap_or((0.0, 1.0)));
    let (y_lo, y_hi) = extent(finite.iter().map(|p| p.1)).unwrap_or((0.0, 1.0));
    let y = Ticks::new((y_lo.min(0.0), y_hi.max(0.0)));

    let mut body = labels(title, x_label, y_label);
    body += &grid(&x, &y);
    body += "<g class=\"legend\">\n";
    for (i, s) in series.iter().enumerate() {
        body += &legend_entry(i, &s.name, PALETTE[i % PALETTE.len()]);
    }
    body += "</g>\n";
    for (i, s) in series.iter().enumerate() {
        body += &series_lines(s, &x, &y, PALETTE[i % PALETTE.len()]);
    }
    document(WIDTH, HEIGHT, &body)
}

/// A heatmap of `values[row][col]`, row 0 at the top, on a light-to-dark scale
/// from the smallest to the largest finite value, or from 0 to `scale_max`
/// when that is given, so that two heatmaps can share a scale (values beyond
/// it get the scale's end colour). Each cell carries a `<title>` naming its
/// row, column and value, shown on hover. Rows may differ in length.
pub fn heatmap(
    title: &str,
    row_label: &str,
    col_label: &str,
    values: &[Vec<f64>],
    scale_max: Option<f64>,
) -> String {
    let rows = values.len();
    let cols = values.iter().map(Vec::len).max().unwrap_or(0);
    let (lo, hi) = scale_range(values, scale_max);
    let cell_w = PLOT.w / cols.max(1) as f64;
    let cell_h = PLOT.h / rows.max(1) as f64;

    let mut body = labels(title, col_label, row_label);
    body += "<g shape-rendering=\"crispEdges\">\n";
    for (r, row) in values.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let fill = if v.is_finite() {
                colour(fraction(v, lo, hi))
            } else {
                MISSING.to_string()
            };
            let cell = Area {
                x: PLOT.x + c as f64 * cell_w,
                y: PLOT.y + r as f64 * cell_h,
                w: cell_w,
                h: cell_h,
            };
            let hover = format!("{row_label} {r}, {col_label} {c}: {}", value_label(v));
            body += &cell.rect(&fill, Some(&hover));
        }
    }
    body += "</g>\n";
    body += &index_labels(rows, cols, cell_w, cell_h);
    body += &colour_bar(lo, hi);
    document(WIDTH, HEIGHT, &body)
}

/// Charts made by this module, one below the other in one document (e.g. the
/// expert load before and after placement).
pub fn stack(charts: &[String]) -> String {
    let mut body = String::new();
    let (mut width, mut height) = (0.0_f64, 0.0);
    for chart in charts {
        let (w, h) = root_size(chart).unwrap_or((WIDTH, HEIGHT));
        body += &format!(
            "<g transform=\"translate(0 {})\">\n{}\n</g>\n",
            num(height),
            chart.trim()
        );
        width = width.max(w);
        height += h;
    }
    document(width, height, &body)
}

/// A rectangle in user units.
struct Area {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

impl Area {
    fn rect(&self, fill: &str, hover: Option<&str>) -> String {
        let open = format!(
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}""#,
            num(self.x),
            num(self.y),
            num(self.w),
            num(self.h)
        );
        match hover {
            Some(hover) => format!("{open}><title>{}</title></rect>\n", escape(hover)),
            None => format!("{open}/>\n"),
        }
    }
}

/// Tick positions at multiples of a "nice" step (1, 2 or 5 × 10^n) that
/// enclose a range; the axis runs from the first tick to the last.
#[derive(Debug)]
struct Ticks {
    values: Vec<f64>,
    step: f64,
}

impl Ticks {
    fn new(range: (f64, f64)) -> Self {
        let (lo, hi) = widen(range);
        let base = 10_f64.powf(((hi - lo) / MAX_INTERVALS).log10().floor());
        let Some(step) = [1.0, 2.0, 5.0, 10.0, 20.0]
            .map(|m| m * base)
            .into_iter()
            .find(|s| (hi / s).ceil() - (lo / s).floor() <= MAX_INTERVALS)
            .filter(|s| s.is_normal())
        else {
            // Only a range too wide or too narrow for f64 gets here.
            return Self::new((0.0, 1.0));
        };
        let first = (lo / step).floor();
        let intervals = ((hi / step).ceil() - first).max(1.0) as usize;
        let values = (0..=intervals).map(|i| (first + i as f64) * step).collect();
        Self { values, step }
    }

    fn lo(&self) -> f64 {
        self.values[0]
    }

    fn hi(&self) -> f64 {
        self.values[self.values.len() - 1]
    }

    /// Where `v` lies along the axis, 0 at its start and 1 at its end.
    fn fraction(&self, v: f64) -> f64 {
        (v - self.lo()) / (self.hi() - self.lo())
    }
}

/// A range with a nonzero width: a single value gets room around it.
fn widen((lo, hi): (f64, f64)) -> (f64, f64) {
    let (lo, hi) = (lo.min(hi), lo.max(hi));
    if !(lo.is_finite() && hi.is_finite()) || lo == 0.0 && hi == 0.0 {
        (0.0, 1.0)
    } else if lo == hi {
        (lo - lo.abs() / 2.0, hi + hi.abs() / 2.0)
    } else {
        (lo, hi)
    }
}

fn is_finite((x, y): (f64, f64)) -> bool {
    x.is_finite() && y.is_finite()
}

/// The smallest and largest finite value, if there is one.
fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((v.min(lo), v.max(hi))),
        })
}

/// The title, the x axis label below the plot and the y axis label, turned,
/// left of it.
fn labels(title: &str, x_label: &str, y_label: &str) -> String {
    let (y_x, y_y) = (num(18.0), num(PLOT.y + PLOT.h / 2.0));
    text(WIDTH / 2.0, 26.0, 16, "middle", title)
        + &text(PLOT.x + PLOT.w / 2.0, HEIGHT - 14.0, 13, "middle", x_label)
        + &format!(
            "<text x=\"{y_x}\" y=\"{y_y}\" transform=\"rotate(-90 {y_x} {y_y})\" font-size=\"13\" text-anchor=\"middle\">{}</text>\n",
            escape(y_label)
        )
}

/// Grid lines and tick labels of both axes, and the axis lines over them.
fn grid(x: &Ticks, y: &Ticks) -> String {
    let (left, right) = (PLOT.x, PLOT.x + PLOT.w);
    let (top, bottom) = (PLOT.y, PLOT.y + PLOT.h);
    let mut out = String::new();
    for &v in &x.values {
        let px = left + x.fraction(v) * PLOT.w;
        out += &line((px, top), (px, bottom), "#e0e0e0");
        out += &text(px, bottom + 18.0, 11, "middle", &tick_label(v, x.step));
    }
    for &v in &y.values {
        let py = bottom - y.fraction(v) * PLOT.h;
        out += &line((left, py), (right, py), "#e0e0e0");
        out += &text(left - 6.0, py + 4.0, 11, "end", &tick_label(v, y.step));
    }
    out + &line((left, top), (left, bottom), "#333333")
        + &line((left, bottom), (right, bottom), "#333333")
}

/// A series' line, broken where a point is not finite, and its markers.
fn series_lines(series: &Series, x: &Ticks, y: &Ticks, colour: &str) -> String {
    let mut d = Vec::new();
    let mut markers = String::new();
    let mut pen_down = false;
    for &(vx, vy) in &series.points {
        if !is_finite((vx, vy)) {
            pen_down = false;
            continue;
        }
        let (px, py) = (
            PLOT.x + x.fraction(vx) * PLOT.w,
            PLOT.y + PLOT.h - y.fraction(vy) * PLOT.h,
        );
        d.push(format!(
            "{}{} {}",
            if pen_down { "L" } else { "M" },
            num(px),
            num(py)
        ));
        pen_down = true;
        markers += &format!(
            "<circle cx=\"{}\" cy=\"{}\" r=\"3\"><title>{}</title></circle>\n",
            num(px),
            num(py),
            escape(&format!(
                "{}: ({}, {})",
                series.name,
                value_label(vx),
                value_label(vy)
            ))
        );
    }
    format!(
        "<g class=\"series\" fill=\"{colour}\">\n<path d=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>\n{markers}</g>\n",
        d.join(" ")
    )
}

/// The `index`th line of the legend: a stroke with a marker, then the name.
fn legend_entry(index: usize, name: &str, colour: &str) -> String {
    let (x, y) = (PLOT.x + PLOT.w + 20.0, PLOT.y + 10.0 + index as f64 * 20.0);
    format!(
        "<g>{}<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{colour}\"/>{}</g>\n",
        line((x, y), (x + 20.0, y), colour).trim_end(),
        num(x + 10.0),
        num(y),
        text(x + 26.0, y + 4.0, 12, "start", name).trim_end()
    )
}

/// Row numbers left of the heatmap and column numbers below it, thinned out
/// to every 2nd, 5th, 10th… where they would overlap.
fn index_labels(rows: usize, cols: usize, cell_w: f64, cell_h: f64) -> String {
    let mut out = String::new();
    let bottom = PLOT.y + PLOT.h;
    for r in (0..rows).step_by(label_stride(rows, PLOT.h / 14.0)) {
        let py = PLOT.y + (r as f64 + 0.5) * cell_h + 4.0;
        out += &text(PLOT.x - 6.0, py, 11, "end", &r.to_string());
    }
    for c in (0..cols).step_by(label_stride(cols, PLOT.w / 28.0)) {
        let px = PLOT.x + (c as f64 + 0.5) * cell_w;
        out += &text(px, bottom + 18.0, 11, "middle", &c.to_string());
    }
    out
}

/// The smallest of 1, 2, 5, 10, 20… that shows at most `room` of `count` labels.
fn label_stride(count: usize, room: f64) -> usize {
    let room = (room as usize).max(1);
    let mut base = 1;
    loop {
        for stride in [base, 2 * base, 5 * base] {
            if count.div_ceil(stride) <= room {
                return stride;
            }
        }
        base *= 10;
    }
}

/// The colour scale right of the heatmap, the maximum at its top.
fn colour_bar(lo: f64, hi: f64) -> String {
    let x = PLOT.x + PLOT.w + 30.0;
    let step_h = PLOT.h / BAR_STEPS as f64;
    let mut out = String::from("<g shape-rendering=\"crispEdges\">\n");
    for i in 0..BAR_STEPS {
        let t = 1.0 - (i as f64 + 0.5) / BAR_STEPS as f64;
        let step = Area {
            x,
            y: PLOT.y + i as f64 * step_h,
            w: 16.0,
            h: step_h,
        };
        out += &step.rect(&colour(t), None);
    }
    out += "</g>\n";
    out + &text(x + 22.0, PLOT.y + 8.0, 11, "start", &value_label(hi))
        + &text(x + 22.0, PLOT.y + PLOT.h, 11, "start", &value_label(lo))
}

/// The values at the light and the dark end of the colour scale.
fn scale_range(values: &[Vec<f64>], scale_max: Option<f64>) -> (f64, f64) {
    match scale_max.filter(|m| m.is_finite()) {
        Some(max) => (max.min(0.0), max.max(0.0)),
        None => extent(values.iter().flatten().copied()).unwrap_or((0.0, 0.0)),
    }
}

/// Where `v` lies between `lo` and `hi`, clamped to [0, 1]; 0 when they are equal.
fn fraction(v: f64, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// The colour at `t` in [0, 1] along [`SCALE`], as `#rrggbb`.
fn colour(t: f64) -> String {
    let pos = t.clamp(0.0, 1.0) * (SCALE.len() - 1) as f64;
    let i = (pos.floor() as usize).min(SCALE.len() - 2);
    let f = pos - i as f64;
    let [r, g, b]: [u8; 3] = std::array::from_fn(|c| {
        let (a, b) = (f64::from(SCALE[i][c]), f64::from(SCALE[i + 1][c]));
        (a + (b - a) * f).round() as u8
    });
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn line((x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str) -> String {
    format!(
        "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{stroke}\"/>\n",
        num(x1),
        num(y1),
        num(x2),
        num(y2)
    )
}

fn text(x: f64, y: f64, size: u32, anchor: &str, content: &str) -> String {
    format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"{size}\" text-anchor=\"{anchor}\">{}</text>\n",
        num(x),
        num(y),
        escape(content)
    )
}

/// A standalone document on a white background.
fn document(width: f64, height: f64, body: &str) -> String {
    let (w, h) = (num(width), num(height));
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

/// The `width` and `height` of a document's root element.
fn root_size(svg: &str) -> Option<(f64, f64)> {
    let start = svg.find("<svg")?;
    let tag = &svg[start..start + svg[start..].find('>')?];
    let attr = |name: &str| -> Option<f64> {
        let value = tag.split(&format!(" {name}=\"")).nth(1)?;
        value.split('"').next()?.parse().ok()
    };
    Some((attr("width")?, attr("height")?))
}

/// Text safe in XML content and in attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out += "&amp;",
            '<' => out += "&lt;",
            '>' => out += "&gt;",
            '"' => out += "&quot;",
            '\'' => out += "&apos;",
            c => out.push(c),
        }
    }
    out
}

/// A coordinate, to 0.01 of a unit, without trailing zeros; 0 for a non-finite
/// value, which callers never pass on purpose.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "0".to_string();
    }
    let s = format!("{v:.2}");
    match s.trim_end_matches('0').trim_end_matches('.') {
        "-0" => "0".to_string(),
        trimmed => trimmed.to_string(),
    }
}

/// A tick label with as many decimals as the step needs, large steps in k, M
/// or G: 0.6 for 3 × 0.2, 4k for 2 × 2000.
fn tick_label(v: f64, step: f64) -> String {
    let (unit, suffix) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(unit, _)| step >= unit)
        .unwrap_or((1.0, ""));
    // The epsilon keeps log10(0.1) = -0.99999… from asking for two decimals.
    let decimals = (-((step / unit).log10() + 1e-9).floor()).max(0.0) as usize;
    let s = format!("{:.*}", decimals, v / unit);
    if s.parse::<f64>().is_ok_and(|p| p == 0.0) {
        "0".to_string()
    } else {
        s + suffix
    }
}

/// A data value to four significant digits, "n/a" when it is not finite.
fn value_label(v: f64) -> String {
    let magnitude = v.abs();
    if !v.is_finite() {
        "n/a".to_string()
    } else if magnitude == 0.0 {
        "0".to_string()
    } else if (1e-3..1e6).contains(&magnitude) {
        let decimals = (3 - magnitude.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        format!("{v:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An element of a parsed document.
    #[derive(Debug, Default)]
    struct Node {
        name: String,
        attrs: Vec<(String, String)>,
        children: Vec<Node>,
        text: String,
    }

    impl Node {
        fn attr(&self, name: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }

        /// This node and all below it, in document order.
        fn all(&self) -> Vec<&Node> {
            let mut out = vec![self];
            for child in &self.children {
                out.extend(child.all());
            }
            out
        }

        fn child(&self, name: &str) -> Option<&Node> {
            self.children.iter().find(|c| c.name == name)
        }
    }

    /// A strict reader for the XML this module writes: elements, attributes in
    /// double quotes, text and the five predefined entities. Panics on
    /// anything else, unbalanced tags included.
    fn parse(doc: &str) -> Node {
        let mut rest = doc.trim();
        let root = element(&mut rest);
        assert!(rest.trim().is_empty(), "after the root: {rest:.60}");
        root
    }

    fn element(rest: &mut &str) -> Node {
        *rest = rest.strip_prefix('<').expect("an element starts with <");
        let mut node = Node {
            name: name(rest),
            ..Node::default()
        };
        loop {
            *rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix("/>") {
                *rest = r;
                return node;
            }
            if let Some(r) = rest.strip_prefix('>') {
                *rest = r;
                break;
            }
            let attr = name(rest);
            *rest = rest.strip_prefix("=\"").expect("a value in double quotes");
            let end = rest.find('"').expect("a closing quote");
            assert!(!rest[..end].contains('<'), "< in attribute {attr}");
            assert!(node.attr(&attr).is_none(), "{attr} twice");
            node.attrs.push((attr, unescape(&rest[..end])));
            *rest = &rest[end + 1..];
        }
        loop {
            let end = rest.find('<').expect("an unclosed element");
            node.text += &unescape(&rest[..end]);
            *rest = &rest[end..];
            if let Some(r) = rest.strip_prefix("</") {
                *rest = r;
                assert_eq!(name(rest), node.name, "mismatched closing tag");
                *rest = rest.strip_prefix('>').expect("> ends a closing tag");
                return node;
            }
            node.children.push(element(rest));
        }
    }

    fn name(rest: &mut &str) -> String {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-_:".contains(c)))
            .unwrap_or(rest.len());
        assert!(end > 0, "a name expected at {rest:.40}");
        let (name, r) = rest.split_at(end);
        *rest = r;
        name.to_string()
    }

    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('&') {
            out += &rest[..i];
            let end = i + rest[i..].find(';').expect("an unterminated entity");
            out.push(match &rest[i + 1..end] {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                other => panic!("unknown entity &{other};"),
            });
            rest = &rest[end + 1..];
        }
        out + rest
    }

    fn luma(fill: &str) -> f64 {
        let hex = fill.strip_prefix('#').expect("a #rrggbb colour");
        let c = |i: usize| f64::from(u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"));
        0.299 * c(0) + 0.587 * c(2) + 0.114 * c(4)
    }

    /// The heatmap cells: rects with a hover title, in document order.
    fn cells(doc: &Node) -> Vec<&Node> {
        doc.all()
            .into_iter()
            .filter(|n| n.name == "rect" && n.child("title").is_some())
            .collect()
    }

    fn assert_no_non_finite(svg: &str) {
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.to_string(),
            points: points.to_vec(),
        }
    }

    fn load() -> Vec<Vec<f64>> {
        vec![
            vec![1.0, 2.0, 3.0, 4.0],
            vec![0.5, 9.0, 2.5, 1.0],
            vec![3.0, 3.0, 0.0, 7.0],
        ]
    }

    #[test]
    fn documents_are_well_formed_standalone_svg() {
        let line = line_chart("t", "x", "y", &[series("a", &[(0.0, 1.0), (1.0, 2.0)])]);
        let heat = heatmap("t", "layer", "expert", &load(), None);
        for svg in [line, heat] {
            let doc = parse(&svg);
            assert_eq!(doc.name, "svg");
            assert_eq!(doc.attr("xmlns"), Some("http://www.w3.org/2000/svg"));
            assert_eq!(doc.attr("viewBox"), Some("0 0 640 400"));
            assert_eq!(root_size(&svg), Some((WIDTH, HEIGHT)));
            assert_eq!(doc.attr("font-family"), Some("sans-serif"));
        }
    }

    #[test]
    fn text_is_escaped() {
        let nasty = r#"a<&>"'b"#;
        let svgs = [
            line_chart(nasty, nasty, nasty, &[series(nasty, &[(1.0, 1.0)])]),
            heatmap(nasty, nasty, nasty, &load(), None),
        ];
        for svg in svgs {
            assert!(svg.contains("a&lt;&amp;&gt;&quot;&apos;b"), "{svg}");
            assert!(!svg.contains("<&>"));
            let doc = parse(&svg);
            let texts = doc.all().into_iter().filter(|n| n.name == "text");
            assert!(texts.filter(|n| n.text == nasty).count() >= 3);
        }
    }

    #[test]
    fn heatmap_has_one_titled_cell_per_value() {
        let values = load();
        let doc = parse(&heatmap("load", "layer", "expert", &values, None));
        let cells = cells(&doc);
        assert_eq!(cells.len(), 3 * 4);
        assert_eq!(
            cells[5].child("title").unwrap().text,
            "layer 1, expert 1: 9"
        );
        assert_eq!(
            cells[4].child("title").unwrap().text,
            "layer 1, expert 0: 0.5"
        );
    }

    #[test]
    fn hottest_cell_is_darkest_and_coldest_lightest() {
        let doc = parse(&heatmap("load", "layer", "expert", &load(), None));
        let lumas: Vec<f64> = cells(&doc)
            .iter()
            .map(|c| luma(c.attr("fill").unwrap()))
            .collect();
        let hottest = lumas[5];
        let coldest = lumas[10];
        assert!(lumas.iter().all(|&l| l >= hottest));
        assert!(lumas.iter().all(|&l| l <= coldest));
        assert_eq!(lumas.iter().filter(|&&l| l == hottest).count(), 1);
        assert!(hottest < coldest);
    }

    #[test]
    fn a_shared_scale_max_lightens_the_hottest_cell() {
        let own = parse(&heatmap("load", "layer", "expert", &load(), None));
        let shared = parse(&heatmap("load", "layer", "expert", &load(), Some(18.0)));
        let fill = |doc: &Node| luma(cells(doc)[5].attr("fill").unwrap());
        assert!(fill(&shared) > fill(&own));
        let labels: Vec<&str> = shared.all().iter().map(|n| n.text.as_str()).collect();
        assert!(labels.contains(&"18") && labels.contains(&"0"));
    }

    #[test]
    fn line_chart_has_one_path_and_one_legend_entry_per_series() {
        let all = [
            series("prefill", &[(1.0, 10.0), (2.0, 20.0), (4.0, 30.0)]),
            series("decode", &[(1.0, 5.0), (2.0, 8.0)]),
            series("none", &[]),
        ];
        let doc = parse(&line_chart("tokens/s", "batch", "tokens/s", &all));
        let nodes = doc.all();
        let paths: Vec<&&Node> = nodes.iter().filter(|n| n.name == "path").collect();
        assert_eq!(paths.len(), 3);
        assert_ne!(paths[0].attr("stroke"), paths[1].attr("stroke"));
        assert_eq!(paths[0].attr("d").unwrap().matches('L').count(), 2);
        let legend = nodes
            .iter()
            .find(|n| n.attr("class") == Some("legend"))
            .unwrap();
        let names: Vec<&str> = legend
            .children
            .iter()
            .map(|entry| entry.child("text").unwrap().text.as_str())
            .collect();
        assert_eq!(names, ["prefill", "decode", "none"]);
        let markers = nodes.iter().filter(|n| n.name == "circle").count();
        assert_eq!(
            markers,
            3 + 2 + 3,
            "one per finite point and one per legend entry"
        );
    }

    #[test]
    fn non_finite_values_are_gaps_and_never_printed() {
        let points = [
            (0.0, 1.0),
            (1.0, f64::NAN),
            (2.0, 3.0),
            (f64::INFINITY, 2.0),
            (3.0, 4.0),
            (f64::NEG_INFINITY, f64::NAN),
        ];
        let svg = line_chart("gaps", "x", "y", &[series("s", &points)]);
        assert_no_non_finite(&svg);
        let doc = parse(&svg);
        let path = doc.all().into_iter().find(|n| n.name == "path").unwrap();
        assert_eq!(path.attr("d").unwrap().matches('M').count(), 3);

        let only_gaps = line_chart("t", "x", "y", &[series("s", &[(f64::NAN, f64::INFINITY)])]);
        assert_no_non_finite(&only_gaps);
        parse(&only_gaps);

        let values = vec![vec![f64::NAN, 1.0], vec![f64::INFINITY, f64::NEG_INFINITY]];
        for scale_max in [None, Some(f64::NAN), Some(f64::INFINITY)] {
            let svg = heatmap("t", "layer", "expert", &values, scale_max);
            assert_no_non_finite(&svg);
            assert_eq!(cells(&parse(&svg)).len(), 4);
        }
        assert_no_non_finite(&heatmap("t", "r", "c", &[vec![f64::NAN]], None));
    }

    #[test]
    fn single_points_equal_values_and_empty_input_render() {
        let charts = [
            line_chart("one", "x", "y", &[series("s", &[(5.0, 5.0)])]),
            line_chart("flat", "x", "y", &[series("s", &[(0.0, 2.0), (1.0, 2.0)])]),
            line_chart("zeros", "x", "y", &[series("s", &[(0.0, 0.0), (1.0, 0.0)])]),
            line_chart("empty", "x", "y", &[]),
            heatmap("equal", "r", "c", &[vec![3.0, 3.0], vec![3.0]], None),
            heatmap("empty", "r", "c", &[], None),
        ];
        for svg in &charts {
            assert_no_non_finite(svg);
            parse(svg);
        }
        let one = parse(&charts[0]);
        let marker = one
            .all()
            .into_iter()
            .find(|n| n.name == "circle" && n.child("title").is_some())
            .unwrap();
        let cx: f64 = marker.attr("cx").unwrap().parse().unwrap();
        assert!((PLOT.x..=PLOT.x + PLOT.w).contains(&cx));
        assert_eq!(cells(&parse(&charts[4])).len(), 3);
    }

    #[test]
    fn nice_ticks_enclose_the_range_with_round_steps() {
        let close = |t: &Ticks, expected: &[f64]| {
            assert_eq!(t.values.len(), expected.len(), "{t:?}");
            for (a, b) in t.values.iter().zip(expected) {
                assert!((a - b).abs() < 1e-9, "{t:?}");
            }
        };
        close(&Ticks::new((0.0, 0.73)), &[0.0, 0.2, 0.4, 0.6, 0.8]);
        close(&Ticks::new((0.0, 1234.0)), &[0.0, 500.0, 1000.0, 1500.0]);
        close(&Ticks::new((0.0, 1.0)), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        close(&Ticks::new((-3.0, 5.0)), &[-4.0, -2.0, 0.0, 2.0, 4.0, 6.0]);
        close(&Ticks::new((0.0, 0.0)), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let five = Ticks::new((5.0, 5.0));
        assert!(five.lo() < 5.0 && five.hi() > 5.0, "{five:?}");
        assert!((4..=6).contains(&five.values.len()), "{five:?}");
        assert_eq!(five.step, 2.0);
        let nan = Ticks::new((f64::NAN, 1.0));
        assert!(nan.values.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn y_axis_starts_at_zero_unless_values_are_negative() {
        let labels = |points: &[(f64, f64)]| -> Vec<String> {
            let doc = parse(&line_chart("t", "x", "y", &[series("s", points)]));
            doc.all()
                .into_iter()
                .filter(|n| n.name == "text" && n.attr("text-anchor") == Some("end"))
                .map(|n| n.text.clone())
                .collect()
        };
        assert_eq!(
            labels(&[(0.0, 40.0), (1.0, 90.0)]),
            ["0", "20", "40", "60", "80", "100"]
        );
        assert_eq!(
            labels(&[(0.0, -3.0), (1.0, 5.0)]),
            ["-4", "-2", "0", "2", "4", "6"]
        );
    }

    #[test]
    fn labels_are_short_and_never_negative_zero() {
        assert_eq!(tick_label(3.0 * 0.2, 0.2), "0.6");
        assert_eq!(tick_label(3.0 * 0.1, 0.1), "0.3");
        assert_eq!(tick_label(-0.0, 0.5), "0");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(4000.0, 2000.0), "4k");
        assert_eq!(tick_label(2.5e9, 5e8), "2500M");
        assert_eq!(value_label(0.123456), "0.1235");
        assert_eq!(value_label(1234.5678), "1235");
        assert_eq!(value_label(2.0), "2");
        assert_eq!(value_label(1.5e7), "1.500e7");
        assert_eq!(value_label(f64::NAN), "n/a");
        assert_eq!(num(-0.001), "0");
        assert_eq!(num(1.23456), "1.23");
        assert_eq!(num(12.5), "12.5");
        assert_eq!(num(f64::INFINITY), "0");
    }

    #[test]
    fn stack_puts_charts_one_below_another() {
        let charts = [
            heatmap("before", "layer", "expert", &load(), Some(9.0)),
            heatmap("after", "layer", "worker", &load(), Some(9.0)),
        ];
        let svg = stack(&charts);
        let doc = parse(&svg);
        assert_eq!(root_size(&svg), Some((WIDTH, 2.0 * HEIGHT)));
        let groups: Vec<&Node> = doc.children.iter().filter(|n| n.name == "g").collect();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[1].attr("transform"), Some("translate(0 400)"));
        assert_eq!(groups[1].child("svg").map(|s| s.name.as_str()), Some("svg"));
        assert_eq!(cells(&doc).len(), 2 * 12);
    }
}
