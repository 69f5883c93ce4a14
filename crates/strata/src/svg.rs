//! Line charts as plain SVG (no dependencies): a few series over a shared
//! x axis, with axes, ticks and a legend.

use std::fmt::Write;

const W: f64 = 960.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 290.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#7f7f7f",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round step of about a fifth of `span`.
fn tick_step(span: f64) -> f64 {
    let raw = (span / 5.0).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// `series`: (name, points (x, y)).
pub fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for &(x, y) in points {
        if x.is_finite() {
            x_max = x_max.max(x);
        }
        if y.is_finite() {
            y_max = y_max.max(y);
        }
    }
    let (x_max, y_max) = (x_max.max(1.0), (y_max * 1.05).max(1e-9));
    let px = |x: f64| LEFT + x / x_max * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / y_max * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="22" font-size="15">{}</text>"#,
        LEFT,
        escape(title)
    );
    let (x0, y0, x1, y1) = (LEFT, H - BOTTOM, W - RIGHT, TOP);
    let _ = write!(
        s,
        r#"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>"#
    );
    let step = tick_step(x_max);
    let mut t = 0.0;
    while t <= x_max + 1e-9 {
        let _ = write!(
            s,
            r#"<line x1="{0}" y1="{y0}" x2="{0}" y2="{1}" stroke="black"/><text x="{0}" y="{2}" text-anchor="middle">{3}</text>"#,
            px(t),
            y0 + 5.0,
            y0 + 18.0,
            t
        );
        t += step;
    }
    let step = tick_step(y_max);
    let mut t = 0.0;
    while t <= y_max + 1e-9 {
        let label = if step < 1.0 {
            format!("{t:.2}")
        } else {
            format!("{t:.0}")
        };
        let _ = write!(
            s,
            r##"<line x1="{x0}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{label}</text>"##,
            py(t),
            x1,
            x0 - 6.0,
            py(t) + 4.0
        );
        t += step;
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        H - 12.0,
        escape(x_label)
    );
    let _ = write!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
        (y0 + y1) / 2.0,
        escape(y_label)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if !path.is_empty() {
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.6"/>"#,
                path.join(" ")
            );
        }
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let _ = write!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{2}" y="{3}">{4}</text>"#,
            W - RIGHT + 12.0,
            W - RIGHT + 32.0,
            W - RIGHT + 38.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_line_and_a_legend_entry_per_series_and_escapes_names() {
        let svg = chart(
            "cost",
            "minutes",
            "$",
            &[
                ("a <b>".into(), vec![(0.0, 0.0), (10.0, 2.5)]),
                ("c".into(), vec![(0.0, 1.0), (10.0, f64::NAN)]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt;b&gt;") && !svg.contains("a <b>"));
        assert!((tick_step(60.0) - 20.0).abs() < 1e-9);
        assert!((tick_step(0.9) - 0.2).abs() < 1e-9);
    }
}
