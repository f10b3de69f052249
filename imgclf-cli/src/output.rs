//! One record per image, as a table, JSON lines or CSV.

use std::io::Write;

use imgclf::Prediction;
use serde::Serialize;

/// How records are written on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// The state of an image that never became a task: unreadable, or refused.
pub const ERROR: &str = "ERROR";

/// What became of one image.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// The file.
    pub path: String,
    /// The task, once the image was accepted.
    pub task_id: Option<String>,
    /// `SUCCESS`, `FAILURE`, `PENDING` or `STARTED` (no result in time) or `ERROR` (never
    /// accepted).
    pub state: String,
    /// The top classes, most probable first.
    pub classification: Vec<Prediction>,
    /// What went wrong.
    pub error: Option<String>,
}

impl Record {
    /// An image that was never accepted.
    pub fn error(path: String, error: String) -> Self {
        Self {
            path,
            task_id: None,
            state: ERROR.into(),
            classification: Vec::new(),
            error: Some(error),
        }
    }

    /// Classified.
    pub fn succeeded(&self) -> bool {
        self.state == "SUCCESS"
    }
}

/// Writes records in `format`; `path_width` aligns the table.
pub struct Writer<W: Write> {
    out: W,
    format: Format,
    path_width: usize,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, format: Format, path_width: usize) -> Self {
        Self {
            out,
            format,
            path_width: path_width.clamp(4, 60),
        }
    }

    pub fn header(&mut self) -> std::io::Result<()> {
        match self.format {
            Format::Jsonl => return Ok(()),
            Format::Table => writeln!(
                self.out,
                "{:<w$}  {:<7}  TOP CLASSES (class id, probability)",
                "PATH",
                "STATE",
                w = self.path_width
            )?,
            Format::Csv => writeln!(
                self.out,
                "path,task_id,state,label,class_id,probability,top_k,error"
            )?,
        }
        self.out.flush()
    }

    /// Writes one record and flushes it, so a reader of a pipe sees each as it comes.
    pub fn record(&mut self, record: &Record) -> std::io::Result<()> {
        match self.format {
            Format::Jsonl => {
                serde_json::to_writer(&mut self.out, record)?;
                writeln!(self.out)?;
            }
            Format::Table => {
                let detail = match &record.error {
                    Some(error) => error.clone(),
                    None => record
                        .classification
                        .iter()
                        .map(|p| {
                            format!(
                                "{} ({}, {:.1}%)",
                                p.label,
                                p.class_id,
                                100.0 * p.probability
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                };
                // One line per record, whatever a file name or an error page holds.
                writeln!(
                    self.out,
                    "{:<w$}  {:<7}  {}",
                    one_line(&record.path),
                    record.state,
                    one_line(&detail),
                    w = self.path_width
                )?;
            }
            Format::Csv => {
                let top = record.classification.first();
                let top_k = serde_json::to_string(&record.classification)?;
                let fields = [
                    record.path.clone(),
                    record.task_id.clone().unwrap_or_default(),
                    record.state.clone(),
                    top.map(|p| p.label.clone()).unwrap_or_default(),
                    top.map(|p| p.class_id.to_string()).unwrap_or_default(),
                    top.map(|p| p.probability.to_string()).unwrap_or_default(),
                    top_k,
                    record.error.clone().unwrap_or_default(),
                ];
                let line: Vec<_> = fields.iter().map(|f| csv_field(f)).collect();
                writeln!(self.out, "{}", line.join(","))?;
            }
        }
        self.out.flush()
    }
}

/// `text` with its line breaks, tabs and other control characters as spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// RFC 4180: a field with a comma, quote or line break is quoted, its quotes doubled.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            path: "a, \"b\".jpg".into(),
            task_id: Some("t".into()),
            state: "SUCCESS".into(),
            classification: vec![Prediction {
                label: "tabby, tabby cat".into(),
                class_id: 281,
                probability: 0.5,
            }],
            error: None,
        }
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let mut out = Vec::new();
        let mut writer = Writer::new(&mut out, Format::Csv, 10);
        writer.header().unwrap();
        writer.record(&record()).unwrap();
        let text = String::from_utf8(out).unwrap();
        let row = text.lines().nth(1).unwrap();
        assert!(
            row.starts_with("\"a, \"\"b\"\".jpg\",t,SUCCESS,\"tabby, tabby cat\",281,0.5,"),
            "{row}"
        );
    }

    #[test]
    fn jsonl_is_one_object_per_line() {
        let mut out = Vec::new();
        let mut writer = Writer::new(&mut out, Format::Jsonl, 10);
        writer.header().unwrap();
        writer.record(&record()).unwrap();
        writer
            .record(&Record::error("x".into(), "bad".into()))
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["classification"][0]["class_id"], 281);
        assert_eq!(lines[1]["state"], "ERROR");
        assert_eq!(lines[1]["error"], "bad");
    }

    #[test]
    fn a_table_row_stays_on_one_line() {
        let mut out = Vec::new();
        let mut writer = Writer::new(&mut out, Format::Table, 10);
        writer.header().unwrap();
        let page = "413 Request Entity Too Large: <html>\r\n<head>\t</head>";
        writer
            .record(&Record::error("a\nb.jpg".into(), page.into()))
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("a b.jpg"), "{text}");
    }
}
