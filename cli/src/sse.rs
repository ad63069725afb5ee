//! Server-sent events, the client side of `GET /v1/jobs/{id}/events`: a parser that takes the body
//! in whatever chunks it arrives and yields whole events (the `text/event-stream` rules Kiln's
//! gateway uses: `event:`, `id:`, `data:` lines, a blank line ends an event, `:` lines are
//! keep-alive comments).

use serde_json::Value;

/// Events longer than this are a broken stream, not a job record (the gateway's records are
/// bounded well below it); the parser refuses to buffer more.
pub const MAX_EVENT_BYTES: usize = 32 * 1024 * 1024;

/// One event, its data parsed as JSON (the gateway always sends JSON; anything else is kept as a
/// string).
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

impl SseEvent {
    /// The JSON line `kiln events --json` prints.
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "event": self.event, "id": self.id, "data": self.data })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("an event of more than {MAX_EVENT_BYTES} bytes")]
pub struct TooLong;

/// Splits a byte stream into events.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    /// Adds a chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), TooLong> {
        if self.buf.len() + chunk.len() > MAX_EVENT_BYTES {
            return Err(TooLong);
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The next whole event in what was pushed, if any (comments and empty blocks skipped).
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let (end, sep) = block_end(&self.buf)?;
            let block: Vec<u8> = self.buf.drain(..end + sep).collect();
            let text = String::from_utf8_lossy(&block[..end]);
            let (mut event, mut id, mut data, mut has_data) = (String::from("message"), None, String::new(), false);
            for line in text.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = value.to_owned(),
                    "id" => id = Some(value.to_owned()),
                    "data" => {
                        if has_data {
                            data.push('\n');
                        }
                        data.push_str(value);
                        has_data = true;
                    }
                    // Comments (`: keep-alive`), `retry:` and unknown fields.
                    _ => {}
                }
            }
            if !has_data {
                continue;
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            return Some(SseEvent { event, id, data });
        }
    }
}

/// Where the first event block ends (`\n\n` or `\r\n\r\n`), and the separator's length.
fn block_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn events_split_across_chunks_come_out_whole() {
        let body = b": keep-alive\n\nevent: status\nid: 3\ndata: {\"status\":\"queued\"}\n\nevent: completed\r\nid: 5\r\ndata: {\"status\":\"succeeded\"}\r\n\r\n";
        let mut p = Parser::default();
        let mut got = Vec::new();
        for chunk in body.chunks(7) {
            p.push(chunk).unwrap();
            while let Some(e) = p.next_event() {
                got.push(e);
            }
        }
        assert_eq!(
            got,
            vec![
                SseEvent { event: "status".into(), id: Some("3".into()), data: json!({"status": "queued"}) },
                SseEvent { event: "completed".into(), id: Some("5".into()), data: json!({"status": "succeeded"}) },
            ]
        );
    }

    #[test]
    fn multi_line_data_is_joined_and_text_kept() {
        let mut p = Parser::default();
        p.push(b"data: one\ndata: two\n\n").unwrap();
        assert_eq!(p.next_event().unwrap().data, json!("one\ntwo"));
        assert_eq!(p.next_event(), None);
    }
}
