//! The bench's results as one SVG chart (`bench --svg PATH`), written by hand: throughput
//! of each mode beside pgbench, per scenario, and the latency of each mode (p50 and p99).

use super::*;

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 190.0;
const BAR_W: f64 = 500.0;
const ROW_H: f64 = 24.0;
const BAR_H: f64 = 16.0;
const PGBENCH: &str = "#9e9e9e";

fn mode_color(mode: &str) -> &'static str {
    match mode {
        "debit-only" => "#4e79a7",
        "e2e log" => "#59a14f",
        "e2e webhook" => "#f28e2b",
        _ => "#b07aa1",
    }
}

/// Text fit for an SVG text node or attribute value.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// A width in pixels for `value` on a scale whose widest bar is `max`.
fn scaled(value: f64, max: f64) -> f64 {
    if max > 0.0 && value.is_finite() && value > 0.0 {
        (value / max * BAR_W).max(1.0)
    } else {
        0.0
    }
}

struct Svg {
    body: String,
    y: f64,
}

impl Svg {
    fn text(&mut self, x: f64, y: f64, class: &str, anchor: &str, text: &str) {
        self.body.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{y:.1}\" class=\"{class}\" text-anchor=\"{anchor}\">{}</text>\n",
            esc(text)
        ));
    }

    fn bar(&mut self, y: f64, width: f64, color: &str, opacity: f64, title: &str) {
        self.body.push_str(&format!(
            "<rect x=\"{LABEL_W:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{BAR_H:.1}\" fill=\"{color}\" \
             fill-opacity=\"{opacity}\"><title>{}</title></rect>\n",
            esc(title)
        ));
    }

    fn heading(&mut self, text: &str) {
        self.y += 34.0;
        self.text(16.0, self.y, "h", "start", text);
        self.y += 12.0;
    }

    fn rule(&mut self) {
        self.body.push_str(&format!(
            "<line x1=\"16\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" class=\"rule\"/>\n",
            self.y + 4.0,
            WIDTH - 16.0
        ));
        self.y += 8.0;
    }
}

/// The chart for `rows`, under `title` and a line saying which run it came from.
pub(super) fn svg(rows: &[Row], title: &str, caption: &str) -> String {
    let mut s = Svg { body: String::new(), y: 0.0 };
    s.y = 30.0;
    s.text(16.0, s.y, "title", "start", title);
    s.y += 20.0;
    s.text(16.0, s.y, "caption", "start", caption);
    throughput_section(&mut s, rows);
    latency_section(&mut s, rows);
    document(&s)
}

/// Throughput: one group per scenario (in the order they first appear), a bar per mode
/// and pgbench's below, all on one scale.
fn throughput_section(s: &mut Svg, rows: &[Row]) {
    s.heading("Throughput (operations per second; grey: pgbench TPC-B-like at the same concurrency)");
    let max_ops = rows
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.ops_per_sec)
        .chain(rows.iter().filter_map(|r| r.pgbench_tps))
        .fold(0.0_f64, f64::max);
    let mut scenarios: Vec<&str> = vec![];
    for r in rows {
        if !scenarios.contains(&r.scenario) {
            scenarios.push(r.scenario);
        }
    }
    for scenario in &scenarios {
        let these: Vec<&Row> = rows.iter().filter(|r| r.scenario == *scenario).collect();
        for r in &these {
            throughput_bar(s, r, max_ops);
        }
        if let Some(tps) = these.iter().find_map(|r| r.pgbench_tps) {
            let label = format!("{scenario} · pgbench (s{}, c{})", these[0].pgbench_scale, these[0].pgbench_clients);
            s.text(LABEL_W - 8.0, s.y + 12.5, "label", "end", &label);
            let w = scaled(tps, max_ops);
            s.bar(s.y, w, PGBENCH, 1.0, &format!("{label}: {tps:.0} tps"));
            s.text(LABEL_W + w + 6.0, s.y + 12.5, "value", "start", &format!("{tps:.0} tps"));
            s.y += ROW_H;
        }
        s.rule();
    }
}

/// One mode's throughput bar (with its ratio to pgbench), or why it failed.
fn throughput_bar(s: &mut Svg, r: &Row, max_ops: f64) {
    let label = format!("{} · {}", r.scenario, r.mode);
    s.text(LABEL_W - 8.0, s.y + 12.5, "label", "end", &label);
    if let Some(e) = &r.error {
        s.text(LABEL_W + 4.0, s.y + 12.5, "failed", "start", &format!("FAILED: {}", first_words(e)));
    } else {
        let w = scaled(r.ops_per_sec, max_ops);
        let mut value = format!("{:.0}/s", r.ops_per_sec);
        if let Some(p) = r.pgbench_tps.filter(|p| *p > 0.0) {
            value.push_str(&format!("  {:.2}x pgbench", r.ops_per_sec / p));
        }
        s.bar(s.y, w, mode_color(r.mode), 1.0, &format!("{label}: {value}"));
        s.text(LABEL_W + w + 6.0, s.y + 12.5, "value", "start", &value);
    }
    s.y += ROW_H;
}

/// Latency: p99 (light) under p50 (dark), per scenario and mode; the rows without a
/// latency phase named below.
fn latency_section(s: &mut Svg, rows: &[Row]) {
    s.heading("Latency, enqueue to done (ms; dark: p50, light: p99)");
    let measured: Vec<&Row> = rows.iter().filter(|r| r.error.is_none() && r.latency_rate > 0.0).collect();
    let max_ms = measured.iter().map(|r| r.p99_ms.max(r.p50_ms)).fold(0.0_f64, f64::max);
    if measured.is_empty() {
        s.y += 6.0;
        s.text(LABEL_W, s.y + 12.5, "caption", "start", "no latency phase in this run");
        s.y += ROW_H;
    }
    for r in &measured {
        let label = format!("{} · {}", r.scenario, r.mode);
        s.text(LABEL_W - 8.0, s.y + 12.5, "label", "end", &label);
        let value = format!("p50 {:.1} · p99 {:.1} ms  at {:.0}/s", r.p50_ms, r.p99_ms, r.latency_rate);
        let (w50, w99) = (scaled(r.p50_ms, max_ms), scaled(r.p99_ms, max_ms));
        s.bar(s.y, w99, mode_color(r.mode), 0.35, &format!("{label}: p99 {:.1} ms", r.p99_ms));
        s.bar(s.y, w50, mode_color(r.mode), 1.0, &format!("{label}: p50 {:.1} ms", r.p50_ms));
        s.text(LABEL_W + w50.max(w99) + 6.0, s.y + 12.5, "value", "start", &value);
        s.y += ROW_H;
    }
    let without: Vec<String> = rows
        .iter()
        .filter(|r| r.error.is_none() && r.latency_rate <= 0.0)
        .map(|r| format!("{} {}", r.scenario, r.mode))
        .collect();
    if !without.is_empty() && !measured.is_empty() {
        s.y += 4.0;
        s.text(LABEL_W, s.y + 12.5, "caption", "start", &format!("no latency phase: {}", without.join(", ")));
        s.y += ROW_H;
    }
}

/// The whole SVG document around what was drawn, as tall as it.
fn document(s: &Svg) -> String {
    let height = s.y + 16.0;
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {WIDTH:.0} {height:.0}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n\
         <style>.title{{font-size:18px;font-weight:bold}} .caption{{font-size:12px;fill:#555}} \
         .h{{font-size:14px;font-weight:bold}} .label{{font-size:12px}} .value{{font-size:12px;fill:#333}} \
         .failed{{font-size:12px;fill:#c62828}} .rule{{stroke:#ddd;stroke-width:1}}</style>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
        s.body
    )
}

fn first_words(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() > 90 {
        format!("{}…", line.chars().take(90).collect::<String>())
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small well-formedness check: tags nest and close, attributes are quoted, text
    /// and attribute values hold no raw `<` and only known entities. Returns the root
    /// element's name and every text node.
    fn check_xml(doc: &str) -> Result<(String, Vec<String>), String> {
        let mut rest = doc.trim_start();
        if let Some(after) = rest.strip_prefix("<?xml") {
            rest = &after[after.find("?>").ok_or("unclosed declaration")? + 2..];
        }
        let mut stack: Vec<String> = vec![];
        let mut root = None;
        let mut texts = vec![];
        while !rest.is_empty() {
            let lt = rest.find('<').unwrap_or(rest.len());
            check_text(&rest[..lt], &stack, &mut texts)?;
            rest = &rest[lt..];
            if rest.is_empty() {
                break;
            }
            let gt = rest.find('>').ok_or("unclosed tag")?;
            let tag = &rest[1..gt];
            rest = &rest[gt + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
                continue;
            }
            let (name, self_closing) = check_open_tag(tag)?;
            if stack.is_empty() {
                if root.is_some() {
                    return Err("two root elements".into());
                }
                root = Some(name.clone());
            }
            if !self_closing {
                stack.push(name);
            }
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        Ok((root.ok_or("no root element")?, texts))
    }

    /// Text between two tags (`stack`: the elements open around it): kept in `texts`
    /// unless blank; none outside the root.
    fn check_text(text: &str, stack: &[String], texts: &mut Vec<String>) -> Result<(), String> {
        if text.contains('>') {
            return Err(format!("stray '>' in text {text:?}"));
        }
        check_entities(text)?;
        if !text.trim().is_empty() {
            if stack.is_empty() {
                return Err(format!("text outside the root: {text:?}"));
            }
            texts.push(text.to_string());
        }
        Ok(())
    }

    /// An opening or self-closing tag's inside (between `<` and `>`): its element's
    /// name, and whether it closes itself.
    fn check_open_tag(tag: &str) -> Result<(String, bool), String> {
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        let name = &tag[..name_end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':') {
            return Err(format!("bad element name {name:?}"));
        }
        check_attributes(name, tag[name_end..].trim())?;
        Ok((name.to_string(), self_closing))
    }

    /// Attributes: name="value" pairs.
    fn check_attributes(name: &str, mut attrs: &str) -> Result<(), String> {
        while !attrs.is_empty() {
            let eq = attrs.find('=').ok_or(format!("attribute without value in <{name}>"))?;
            let key = attrs[..eq].trim();
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(format!("bad attribute name {key:?} in <{name}>"));
            }
            let value = attrs[eq + 1..].strip_prefix('"').ok_or(format!("unquoted {key} in <{name}>"))?;
            let close = value.find('"').ok_or(format!("unterminated {key} in <{name}>"))?;
            let v = &value[..close];
            if v.contains('<') {
                return Err(format!("'<' in {key}"));
            }
            check_entities(v)?;
            attrs = value[close + 1..].trim_start();
        }
        Ok(())
    }

    /// Every `&` starts a known entity (or a character reference) ended by `;`.
    fn check_entities(t: &str) -> Result<(), String> {
        let mut parts = t.split('&');
        parts.next();
        for p in parts {
            let name = &p[..p.find(';').ok_or(format!("unterminated entity in {t:?}"))?];
            if !["amp", "lt", "gt", "quot", "apos"].contains(&name) && !name.starts_with('#') {
                return Err(format!("unknown entity &{name};"));
            }
        }
        Ok(())
    }

    fn rows() -> Vec<Row> {
        let row = |scenario, mode, ops, p50, p99| Row {
            scenario,
            mode,
            gateway: Some("log"),
            threads: 4,
            pgbench_clients: 4,
            ops_per_sec: ops,
            latency_rate: if p50 > 0.0 { ops / 2.0 } else { 0.0 },
            p50_ms: p50,
            p99_ms: p99,
            pgbench_scale: 10,
            pgbench_tps: Some(3361.0),
            audit_clean: true,
            ..Row::default()
        };
        vec![
            row("spread", "debit-only", 21470.0, 35.9, 80.0),
            row("spread", "e2e log", 12116.0, 57.5, 132.5),
            Row { error: Some("worker exited <1> & gave up".into()), ..row("spread", "e2e webhook", 0.0, 0.0, 0.0) },
            row("hot", "debit-only", 14956.0, 6.0, 13.0),
            Row { gateway: None, ..row("transfers", "transfer", 1958.0, 0.0, 0.0) },
        ]
    }

    #[test]
    fn the_chart_is_well_formed_svg_with_every_scenario_and_mode() {
        let doc = svg(&rows(), "ledger bench", "a run on <a machine> & \"quotes\"");
        let (root, texts) = check_xml(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
        assert_eq!(root, "svg");
        let all = texts.join("\n");
        for label in [
            "spread · debit-only",
            "spread · e2e log",
            "spread · e2e webhook",
            "hot · debit-only",
            "transfers · transfer",
            "spread · pgbench (s10, c4)",
            "hot · pgbench (s10, c4)",
            "transfers · pgbench (s10, c4)",
        ] {
            assert!(all.contains(label), "{label} missing from\n{all}");
        }
        assert!(all.contains("21470/s  6.39x pgbench"), "{all}");
        assert!(all.contains("p50 57.5 · p99 132.5 ms  at 6058/s"), "{all}");
        assert!(all.contains("FAILED: worker exited &lt;1&gt; &amp; gave up"), "escaped: {all}");
        assert!(all.contains("no latency phase: transfers transfer"), "{all}");
        // The widest throughput bar is the fastest row, at full width.
        assert!(doc.contains(&format!("width=\"{BAR_W:.1}\"")), "{doc}");
    }

    #[test]
    fn the_checker_refuses_broken_xml() {
        for bad in ["<svg><text>a</svg>", "<svg x=1></svg>", "<svg>a < b</svg>", "<svg>&nbsp;</svg>", "<a/><b/>"] {
            assert!(check_xml(bad).is_err(), "{bad}");
        }
        assert!(check_xml("<svg><g a=\"1\"/><text>x &amp; y</text></svg>").is_ok());
    }

    #[test]
    fn an_empty_run_still_draws() {
        let (root, texts) = check_xml(&svg(&[], "t", "c")).unwrap();
        assert_eq!(root, "svg");
        assert!(texts.iter().any(|t| t.contains("no latency phase in this run")));
    }
}
