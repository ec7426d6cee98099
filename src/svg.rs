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

/// A line chart with axes, ticks and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (720.0, 440.0);
    let (left, right, top, bottom) = (70.0, 150.0, 40.0, 55.0);
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
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
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
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 12.0,
        escape(x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
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
            r#"<path d="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            d.trim_end()
        );
        for &(x, y) in &s.points {
            let _ = writeln!(
                o,
                r#"<circle cx="{:.2}" cy="{:.2}" r="3" fill="{color}"/>"#,
                sx(x),
                sy(y)
            );
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// A heatmap of counts: one row per layer, one column per expert, darker is hotter (each
/// layer scaled to its own maximum so every layer's skew shows).
pub fn heatmap(title: &str, counts: &Counts) -> String {
    let (l, e) = (counts.n_layer.max(1), counts.n_expert.max(1));
    let cell_w = (900.0 / e as f64).clamp(2.0, 16.0);
    let cell_h = (600.0 / l as f64).clamp(4.0, 16.0);
    let (left, top) = (60.0, 40.0);
    let w = left + cell_w * e as f64 + 20.0;
    let h = top + cell_h * l as f64 + 40.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="{w:.0}" height="{h:.0}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="22" font-size="14">{}</text>"#,
        escape(title)
    );
    for layer in 0..counts.n_layer {
        let row = counts.layer(layer);
        let max = row.iter().copied().max().unwrap_or(0).max(1) as f64;
        let y = top + cell_h * layer as f64;
        if counts.n_layer <= 64 || layer % 4 == 0 {
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{layer}</text>"#,
                left - 6.0,
                y + cell_h * 0.8
            );
        }
        for (ex, &c) in row.iter().enumerate() {
            let v = c as f64 / max;
            // White to dark red.
            let g = (255.0 * (1.0 - v)).round() as u8;
            let r = (255.0 - 120.0 * v).round() as u8;
            let _ = write!(
                o,
                r#"<rect x="{:.1}" y="{y:.1}" width="{cell_w:.1}" height="{cell_h:.1}" fill="rgb({r},{g},{g})"><title>layer {layer} expert {ex}: {c}</title></rect>"#,
                left + cell_w * ex as f64
            );
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="{:.1}">experts 0..{} (columns), layers (rows); darker = more tokens</text>"#,
        top + cell_h * l as f64 + 24.0,
        e - 1
    );
    o.push_str("</svg>\n");
    o
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
        assert_eq!(s.matches("<circle").count(), 2);
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
