//! Line charts: a few series over a shared x axis, with axes, ticks and a
//! legend, laid out once as marks and drawn as SVG (plain text) or PNG
//! (rasterised here, 8x8 bitmap glyphs).

use std::fmt::Write;

const W: f64 = 960.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 290.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const BLACK: [u8; 3] = [0, 0, 0];
const GRID: [u8; 3] = [0xdd, 0xdd, 0xdd];
const COLOURS: [[u8; 3]; 6] = [
    [0x1f, 0x77, 0xb4],
    [0xd6, 0x27, 0x28],
    [0x2c, 0xa0, 0x2c],
    [0x94, 0x67, 0xbd],
    [0xff, 0x7f, 0x0e],
    [0x7f, 0x7f, 0x7f],
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Anchor {
    Start,
    Middle,
    End,
}

#[derive(Debug, Clone, PartialEq)]
enum Mark {
    /// A polyline (two points: a line).
    Line {
        points: Vec<(f64, f64)>,
        colour: [u8; 3],
        width: f64,
    },
    /// Text whose baseline starts, centres or ends at `at`; `vertical`
    /// reads upwards.
    Text {
        at: (f64, f64),
        text: String,
        size: f64,
        anchor: Anchor,
        vertical: bool,
    },
}

/// A laid-out chart.
pub struct Chart {
    marks: Vec<Mark>,
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

fn line(points: Vec<(f64, f64)>, colour: [u8; 3], width: f64) -> Mark {
    Mark::Line {
        points,
        colour,
        width,
    }
}

fn text(at: (f64, f64), text: String, size: f64, anchor: Anchor) -> Mark {
    Mark::Text {
        at,
        text,
        size,
        anchor,
        vertical: false,
    }
}

/// `series`: (name, points (x, y)).
pub fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Chart {
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
    let (x0, y0, x1, y1) = (LEFT, H - BOTTOM, W - RIGHT, TOP);
    let mut marks = vec![
        text((LEFT, 22.0), title.into(), 15.0, Anchor::Start),
        line(vec![(x0, y1), (x0, y0), (x1, y0)], BLACK, 1.0),
    ];
    let step = tick_step(x_max);
    let mut t = 0.0;
    while t <= x_max + 1e-9 {
        marks.push(line(vec![(px(t), y0), (px(t), y0 + 5.0)], BLACK, 1.0));
        marks.push(text(
            (px(t), y0 + 18.0),
            format!("{t}"),
            12.0,
            Anchor::Middle,
        ));
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
        marks.push(line(vec![(x0, py(t)), (x1, py(t))], GRID, 1.0));
        marks.push(text((x0 - 6.0, py(t) + 4.0), label, 12.0, Anchor::End));
        t += step;
    }
    marks.push(text(
        ((x0 + x1) / 2.0, H - 12.0),
        x_label.into(),
        12.0,
        Anchor::Middle,
    ));
    marks.push(Mark::Text {
        at: (16.0, (y0 + y1) / 2.0),
        text: y_label.into(),
        size: 12.0,
        anchor: Anchor::Middle,
        vertical: true,
    });
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<(f64, f64)> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        if !path.is_empty() {
            marks.push(line(path, colour, 1.6));
        }
        let ly = TOP + 10.0 + i as f64 * 18.0;
        marks.push(line(vec![(x1 + 12.0, ly), (x1 + 32.0, ly)], colour, 3.0));
        marks.push(text(
            (x1 + 38.0, ly + 4.0),
            name.clone(),
            12.0,
            Anchor::Start,
        ));
    }
    Chart { marks }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn hex([r, g, b]: [u8; 3]) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

impl Chart {
    pub fn svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        for m in &self.marks {
            match m {
                Mark::Line {
                    points,
                    colour,
                    width,
                } => {
                    let pts: Vec<String> = points
                        .iter()
                        .map(|(x, y)| format!("{x:.1},{y:.1}"))
                        .collect();
                    let _ = write!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{width}"/>"#,
                        pts.join(" "),
                        hex(*colour)
                    );
                }
                Mark::Text {
                    at: (x, y),
                    text,
                    size,
                    anchor,
                    vertical,
                } => {
                    let anchor = match anchor {
                        Anchor::Start => "start",
                        Anchor::Middle => "middle",
                        Anchor::End => "end",
                    };
                    let rotate = if *vertical {
                        format!(r#" transform="rotate(-90 {x} {y})""#)
                    } else {
                        String::new()
                    };
                    let _ = write!(
                        s,
                        r#"<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}"{rotate}>{}</text>"#,
                        escape(text)
                    );
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// The chart as an RGB PNG of the same size.
    pub fn png(&self) -> Vec<u8> {
        let mut canvas = Canvas::new(W as usize, H as usize);
        for m in &self.marks {
            match m {
                Mark::Line {
                    points,
                    colour,
                    width,
                } => {
                    for pair in points.windows(2) {
                        canvas.segment(pair[0], pair[1], *colour, *width);
                    }
                }
                Mark::Text {
                    at,
                    text,
                    size,
                    anchor,
                    vertical,
                } => canvas.text(*at, text, *size, *anchor, *vertical),
            }
        }
        canvas.encode()
    }
}

/// An RGB pixel buffer, white to start with.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, colour: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&colour);
        }
    }

    /// A straight stroke `width` pixels wide: squares stamped every half pixel.
    fn segment(&mut self, (ax, ay): (f64, f64), (bx, by): (f64, f64), colour: [u8; 3], width: f64) {
        let steps = ((bx - ax).hypot(by - ay) * 2.0).ceil().max(1.0) as usize;
        let r = ((width - 1.0) / 2.0).max(0.0);
        for k in 0..=steps {
            let f = k as f64 / steps as f64;
            let (x, y) = (ax + (bx - ax) * f, ay + (by - ay) * f);
            for py in (y - r).round() as i64..=(y + r).round() as i64 {
                for px in (x - r).round() as i64..=(x + r).round() as i64 {
                    self.set(px, py, colour);
                }
            }
        }
    }

    /// 8x8 glyphs, doubled above 14 px; ASCII only (others drawn as '?').
    fn text(&mut self, (x, y): (f64, f64), s: &str, size: f64, anchor: Anchor, vertical: bool) {
        let scale: i64 = if size > 14.0 { 2 } else { 1 };
        let advance = 7 * scale;
        let len = s.chars().count() as i64 * advance;
        let start = match anchor {
            Anchor::Start => 0,
            Anchor::Middle => -len / 2,
            Anchor::End => -len,
        };
        let (x, y) = (x.round() as i64, y.round() as i64);
        for (n, c) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[if c.is_ascii() {
                c as usize
            } else {
                '?' as usize
            }];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 0 {
                        continue;
                    }
                    for dy in 0..scale {
                        for dx in 0..scale {
                            // Along the text, and down from the cap line
                            // (the baseline is one row below the glyph's 7th).
                            let along = start + n as i64 * advance + col * scale + dx;
                            let down = (row as i64 - 7) * scale + dy;
                            if vertical {
                                self.set(x + down, y - along, BLACK);
                            } else {
                                self.set(x + along, y + down, BLACK);
                            }
                        }
                    }
                }
            }
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Writing into a Vec of the right size cannot fail.
        let mut writer = encoder.write_header().expect("png header");
        writer.write_image_data(&self.pixels).expect("png data");
        writer.finish().expect("png end");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Chart {
        chart(
            "cost",
            "minutes",
            "$",
            &[
                ("a <b>".into(), vec![(0.0, 0.0), (10.0, 2.5)]),
                ("c".into(), vec![(0.0, 1.0), (10.0, f64::NAN)]),
            ],
        )
    }

    #[test]
    fn a_chart_has_a_line_and_a_legend_entry_per_series_and_escapes_names() {
        let svg = sample().svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Axes, 6 x ticks (0..10 by 2), 3 grid lines (0..2 by 1), 2 series,
        // 2 legend swatches.
        assert_eq!(svg.matches("<polyline").count(), 1 + 6 + 3 + 2 + 2);
        assert!(svg.contains("a &lt;b&gt;") && !svg.contains("a <b>"));
        assert!((tick_step(60.0) - 20.0).abs() < 1e-9);
        assert!((tick_step(0.9) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn the_png_decodes_to_the_chart_size_with_the_series_colours_drawn() {
        let bytes = sample().png();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        let pixels: Vec<[u8; 3]> = buf.chunks(3).map(|p| [p[0], p[1], p[2]]).collect();
        let count = |c: [u8; 3]| pixels.iter().filter(|&&p| p == c).count();
        // Both series' lines and swatches, black text and axes, white ground.
        assert!(count(COLOURS[0]) > 100 && count(COLOURS[1]) > 60);
        assert!(count(BLACK) > 500 && count([255, 255, 255]) > pixels.len() / 2);
        // The first series rises from the bottom-left corner of the plot.
        let at = |x: f64, y: f64| pixels[(y as usize) * W as usize + x as usize];
        assert_eq!(at(LEFT + 1.0, H - BOTTOM - 1.0), COLOURS[0]);
    }
}
