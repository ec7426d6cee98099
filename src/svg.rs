//! Hand-written SVG pictures: miss-ratio curves and hotness heatmaps.
//!
//! Owns turning numbers into a standalone SVG document string that a browser opens. It never
//! writes files (callers write the string atomically) and draws nothing it was not given.

use std::fmt::Write as _;

use crate::cache::Counts;

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2",
];

/// Escapes text for use inside SVG elements and attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// One named line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Dash patterns of successive lines (solid first).
const DASHES: [&str; 7] = ["", "9,4", "2,3", "12,3,3,3", "5,5", "1,5", "14,4,2,4,2,4"];
/// Marker shapes of successive lines.
const MARKERS: [&str; 7] = [
    "circle",
    "square",
    "triangle",
    "diamond",
    "triangle-down",
    "plus",
    "cross",
];

/// A rough width in pixels of `text` in a sans-serif font of `size` px (a wide average, so a
/// title sized by it fits).
pub fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.6
}

/// An SVG marker of shape `shape` centred at (x, y).
fn marker(shape: &str, x: f64, y: f64, color: &str, series: usize) -> String {
    let r = 4.0;
    let common = format!(r#"class="marker" data-series="{series}" data-shape="{shape}""#);
    match shape {
        "circle" => format!(r#"<circle {common} cx="{x:.2}" cy="{y:.2}" r="{r}" fill="{color}"/>"#),
        "square" => format!(
            r#"<path {common} d="M{:.2},{:.2} h{s} v{s} h-{s} z" fill="{color}"/>"#,
            x - r,
            y - r,
            s = 2.0 * r
        ),
        "triangle" => format!(
            r#"<path {common} d="M{x:.2},{:.2} L{:.2},{:.2} L{:.2},{:.2} z" fill="{color}"/>"#,
            y - r - 1.0,
            x + r + 0.5,
            y + r,
            x - r - 0.5,
            y + r
        ),
        "triangle-down" => format!(
            r#"<path {common} d="M{x:.2},{:.2} L{:.2},{:.2} L{:.2},{:.2} z" fill="white" stroke="{color}" stroke-width="1.5"/>"#,
            y + r + 1.0,
            x + r + 0.5,
            y - r,
            x - r - 0.5,
            y - r
        ),
        "diamond" => format!(
            r#"<path {common} d="M{x:.2},{:.2} L{:.2},{y:.2} L{x:.2},{:.2} L{:.2},{y:.2} z" fill="white" stroke="{color}" stroke-width="1.5"/>"#,
            y - r - 1.0,
            x + r + 1.0,
            y + r + 1.0,
            x - r - 1.0
        ),
        "plus" => format!(
            r#"<path {common} d="M{:.2},{y:.2} h{d} M{x:.2},{:.2} v{d}" stroke="{color}" stroke-width="2.5" fill="none"/>"#,
            x - r - 1.0,
            y - r - 1.0,
            d = 2.0 * r + 2.0
        ),
        _ => format!(
            r#"<path {common} d="M{:.2},{:.2} l{d},{d} M{:.2},{:.2} l{d},-{d}" stroke="{color}" stroke-width="2.5" fill="none"/>"#,
            x - r,
            y - r,
            x - r,
            y + r,
            d = 2.0 * r
        ),
    }
}

/// A line chart with axes, ticks, axis titles and a legend. Each line has its own colour,
/// dash pattern and marker, and earlier lines are drawn wider, so lines that coincide stay
/// visible; the data are drawn as given.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let title_size = 15.0;
    let (left, right, top, bottom) = (70.0, 150.0, 40.0, 55.0);
    let w = (720.0f64).max((text_width(title, title_size) + 40.0).ceil());
    let h = 440.0;
    let (pw, ph) = (w - left - right, h - top - bottom);
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut y1: f64 = 0.0;
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { nice_ceil(y1) };
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - y / y1 * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text class="title" x="{}" y="22" text-anchor="middle" font-size="{title_size}">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    // Axes and ticks.
    let _ = writeln!(
        o,
        r##"<path d="M{left},{top} V{} H{}" fill="none" stroke="#333"/>"##,
        top + ph,
        left + pw
    );
    for i in 0..=5 {
        let y = y1 * f64::from(i) / 5.0;
        let _ = writeln!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{yy:.2}" y2="{yy:.2}" stroke="#ddd"/><text x="{}" y="{:.2}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            sy(y) + 4.0,
            fmt_num(y),
            yy = sy(y),
        );
    }
    let mut xs: Vec<f64> = pts().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let stride = xs.len().div_ceil(10).max(1);
    for x in xs.iter().step_by(stride) {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(*x),
            top + ph + 18.0,
            fmt_num(*x)
        );
    }
    let _ = writeln!(
        o,
        r#"<text class="axis-title" x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 12.0,
        escape(x_label)
    );
    let _ = writeln!(
        o,
        r#"<text class="axis-title" transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    let n = series.len().max(1) as f64;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let dash = DASHES[i % DASHES.len()];
        let shape = MARKERS[i % MARKERS.len()];
        // Earlier lines wider: a later line on top leaves an earlier one showing at its sides.
        let width = 1.5 + 2.5 * (n - 1.0 - i as f64) / n;
        let dash_attr = if dash.is_empty() {
            String::new()
        } else {
            format!(r#" stroke-dasharray="{dash}""#)
        };
        let mut d = String::new();
        for (j, &(x, y)) in s.points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.2},{:.2} ",
                if j == 0 { "M" } else { "L" },
                sx(x),
                sy(y)
            );
        }
        let _ = writeln!(
            o,
            r#"<path class="series" data-series="{i}" d="{}" fill="none" stroke="{color}" stroke-width="{width:.2}"{dash_attr}/>"#,
            d.trim_end()
        );
        for &(x, y) in &s.points {
            let _ = writeln!(o, "{}", marker(shape, sx(x), sy(y), color, i));
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            o,
            r#"<g class="legend" data-series="{i}"><line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash_attr}/>{}<text x="{}" y="{}">{}</text></g>"#,
            lx + 28.0,
            marker(shape, lx + 14.0, ly, color, i)
                .replace("class=\"marker\"", "class=\"legend-marker\""),
            lx + 34.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// A heatmap of counts: one row per layer, one column per expert, darker is hotter (each
/// layer scaled to its own maximum so every layer's skew shows), with axis titles and a colour
/// scale. It is at least 480 px wide and wide enough for its title.
pub fn heatmap(title: &str, counts: &Counts) -> String {
    let (l, e) = (counts.n_layer.max(1), counts.n_expert.max(1));
    let cell_w = (900.0 / e as f64).clamp(2.0, 40.0);
    let cell_h = (600.0 / l as f64).clamp(4.0, 24.0);
    let (left, top) = (70.0, 48.0);
    let title_size = 14.0;
    let grid_w = cell_w * e as f64;
    let grid_h = cell_h * l as f64;
    // The colour scale sits right of the grid.
    let scale_x = left + grid_w + 24.0;
    let w = (scale_x + 150.0)
        .max(480.0)
        .max(12.0 + text_width(title, title_size) + 12.0)
        .ceil();
    let scale_h = grid_h.max(80.0);
    let h = (top + grid_h.max(scale_h) + 62.0).ceil();
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="{w:.0}" height="{h:.0}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text class="title" x="12" y="24" font-size="{title_size}">{}</text>"#,
        escape(title)
    );
    for layer in 0..counts.n_layer {
        let row = counts.layer(layer);
        let max = row.iter().copied().max().unwrap_or(0).max(1) as f64;
        let y = top + cell_h * layer as f64;
        let stride = counts.n_layer.div_ceil(32).max(1);
        if layer % stride == 0 {
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{layer}</text>"#,
                left - 6.0,
                y + cell_h * 0.5 + 4.0
            );
        }
        for (ex, &c) in row.iter().enumerate() {
            let v = c as f64 / max;
            let (r, g) = shade(v);
            let _ = write!(
                o,
                r#"<rect x="{:.1}" y="{y:.1}" width="{cell_w:.1}" height="{cell_h:.1}" fill="rgb({r},{g},{g})"><title>layer {layer} expert {ex}: {c}</title></rect>"#,
                left + cell_w * ex as f64
            );
        }
        o.push('\n');
    }
    // Expert ticks under the grid, at least 26 px apart.
    let stride = ((26.0 / cell_w).ceil() as usize).max(1);
    for ex in (0..counts.n_expert).step_by(stride) {
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{ex}</text>"#,
            left + cell_w * (ex as f64 + 0.5),
            top + grid_h + 14.0
        );
    }
    let _ = writeln!(
        o,
        r#"<text class="axis-title" x="{:.1}" y="{:.1}" text-anchor="middle">expert</text>"#,
        left + grid_w / 2.0,
        top + grid_h + 32.0
    );
    let _ = writeln!(
        o,
        r#"<text class="axis-title" transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">layer</text>"#,
        top + grid_h / 2.0
    );
    // The colour scale: white (no tokens) to dark red (the layer's busiest expert).
    let _ = writeln!(
        o,
        r#"<defs><linearGradient id="heat" x1="0" y1="1" x2="0" y2="0"><stop offset="0" stop-color="rgb(255,255,255)"/><stop offset="1" stop-color="rgb(135,0,0)"/></linearGradient></defs>"#
    );
    let _ = writeln!(
        o,
        r##"<g class="legend"><rect class="scale" y="{top}" x="{scale_x:.1}" width="14" height="{scale_h:.1}" fill="url(#heat)" stroke="#999"/>"##
    );
    for (frac, label) in [(0.0, "0"), (0.5, "50%"), (1.0, "100%")] {
        let y = top + scale_h * (1.0 - frac);
        let _ = writeln!(
            o,
            r##"<line x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}">{label}</text>"##,
            scale_x + 14.0,
            scale_x + 18.0,
            scale_x + 21.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}">tokens, share of</text><text x="{:.1}" y="{:.1}">the layer's busiest</text></g>"#,
        scale_x - 4.0,
        top + scale_h + 16.0,
        scale_x - 4.0,
        top + scale_h + 29.0
    );
    o.push_str("</svg>\n");
    o
}

/// The heatmap colour of `v` in [0, 1]: white to dark red, as (red, green = blue).
fn shade(v: f64) -> (u8, u8) {
    let g = (255.0 * (1.0 - v)).round() as u8;
    let r = (255.0 - 120.0 * v).round() as u8;
    (r, g)
}

fn nice_ceil(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * p + 1e-12 {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_num(v: f64) -> String {
    if v == v.round() && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_a_standalone_svg() {
        let s = line_chart(
            "misses <&>",
            "slots",
            "miss ratio",
            &[Series {
                name: "lru".into(),
                points: vec![(16.0, 0.5), (32.0, 0.25)],
            }],
        );
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains("misses &lt;&amp;&gt;"));
        assert!(s.contains(">lru</text>"));
        assert_eq!(s.matches(r#"class="marker""#).count(), 2);
    }

    /// The viewBox width and height of an SVG document.
    fn view_box(svg: &str) -> (f64, f64) {
        let v = svg.split("viewBox=\"").nth(1).unwrap();
        let nums: Vec<f64> = v
            .split('"')
            .next()
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        (nums[2], nums[3])
    }

    /// The text of the first `<text class="{class}" ...>` and its x, anchor and font size.
    fn text_of(svg: &str, class: &str) -> (String, f64, String, f64) {
        let start = svg.find(&format!(r#"<text class="{class}""#)).unwrap();
        let tag = &svg[start..];
        let attrs = &tag[..tag.find('>').unwrap()];
        let attr = |name: &str| {
            attrs
                .split(&format!(" {name}=\""))
                .nth(1)
                .map(|v| v.split('"').next().unwrap().to_string())
        };
        let text = tag[tag.find('>').unwrap() + 1..tag.find("</text>").unwrap()].to_string();
        (
            text,
            attr("x").unwrap().parse().unwrap(),
            attr("text-anchor").unwrap_or_else(|| "start".into()),
            attr("font-size").unwrap().parse().unwrap(),
        )
    }

    /// Whether the title, by its estimated width, lies inside the viewBox.
    fn title_fits(svg: &str) -> bool {
        let (w, _) = view_box(svg);
        let (text, x, anchor, size) = text_of(svg, "title");
        let tw = text_width(&text, size);
        let (a, b) = match anchor.as_str() {
            "middle" => (x - tw / 2.0, x + tw / 2.0),
            "end" => (x - tw, x),
            _ => (x, x + tw),
        };
        a >= 0.0 && b <= w
    }

    #[test]
    fn small_heatmap_is_readable_without_help() {
        let mut c = Counts::zero(2, 6);
        c.set(0, 0, 9);
        c.set(1, 2, 8);
        let title = "expert hotness: /models/OLMoE-1B-7B-0924-Q4_K_M.gguf (2 layers, 6 experts)";
        let s = heatmap(title, &c);
        let (w, _) = view_box(&s);
        assert!(w >= 480.0, "{w}");
        assert!(title_fits(&s), "title cut at width {w}");
        assert!(s.contains(">expert</text>") && s.contains(">layer</text>"));
        // A colour scale with values at both ends.
        assert!(s.contains("<linearGradient id=\"heat\""));
        assert!(s.contains(r#"fill="url(#heat)""#));
        assert!(s.contains(">0</text>") && s.contains(">100%</text>"));
        // Expert ticks for every column of a narrow map.
        for ex in 0..6 {
            assert!(s.contains(&format!(">{ex}</text>")), "{ex}");
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn chart_lines_are_told_apart_and_the_title_fits() {
        let names = ["lru", "lfu", "lfru", "static", "pin-lru", "belady", "spark"];
        // Identical points: every line lies on the others.
        let series: Vec<Series> = names
            .iter()
            .map(|n| Series {
                name: n.to_string(),
                points: vec![(8.0, 0.5), (16.0, 0.3), (64.0, 0.0)],
            })
            .collect();
        let title = "miss ratio vs slots per layer: a-rather-long-trace-name-from-a-real-run-of-a-model.jsonl (150 scored steps)";
        let s = line_chart(title, "slots per layer", "miss ratio", &series);
        assert!(title_fits(&s));
        assert!(s.contains(">slots per layer</text>") && s.contains(">miss ratio</text>"));
        let mut styles = std::collections::BTreeSet::new();
        for i in 0..names.len() {
            let at = s
                .find(&format!(r#"<path class="series" data-series="{i}""#))
                .unwrap();
            let tag = &s[at..at + s[at..].find("/>").unwrap()];
            let dash = tag
                .split("stroke-dasharray=\"")
                .nth(1)
                .map(|d| d.split('"').next().unwrap().to_string());
            let shape = s
                .split(&format!(r#"class="marker" data-series="{i}" data-shape=""#))
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string();
            assert_eq!(
                s.matches(&format!(r#"class="marker" data-series="{i}""#))
                    .count(),
                3
            );
            assert!(s.contains(&format!(r#"<g class="legend" data-series="{i}""#)));
            assert!(s.contains(&format!(">{}</text>", names[i])));
            styles.insert((dash.clone(), shape.clone()));
            // Each line differs from every other in dash pattern and in marker.
            assert_eq!(
                styles.iter().filter(|(d, _)| *d == dash).count(),
                1,
                "dash of {}",
                names[i]
            );
            assert_eq!(
                styles.iter().filter(|(_, m)| *m == shape).count(),
                1,
                "marker of {}",
                names[i]
            );
        }
    }

    #[test]
    fn heatmap_has_a_cell_per_layer_and_expert() {
        let mut c = Counts::zero(2, 3);
        c.set(1, 2, 9);
        let s = heatmap("h", &c);
        assert_eq!(s.matches("<rect x=").count(), 6);
        assert!(s.contains("layer 1 expert 2: 9"));
        assert!(s.contains("rgb(135,0,0)"));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceil(0.37), 0.5);
        assert_eq!(nice_ceil(1.0), 1.0);
        assert_eq!(nice_ceil(0.9), 1.0);
    }
}
