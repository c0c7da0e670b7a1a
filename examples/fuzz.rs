//! A property harness over the parsers clients reach (stable Rust, no cargo-fuzz): random and
//! mutated inputs for a time budget per target, with executions counted. Run it with
//! `scripts/fuzz.sh [SECONDS_PER_TARGET]`; any broken property panics with the input.

use std::time::{Duration, Instant};

fn masked(opcode_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![opcode_byte];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let mask = [1, 2, 3, 4];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let frames = vec![
        [masked(0x81, b"hello"), masked(0x89, b"ping")].concat(),
        [masked(0x01, "h\u{e9}".as_bytes()), masked(0x80, b"llo")].concat(),
        masked(0x88, &[0x03, 0xe8, b'o', b'k']),
        masked(0x82, &[0u8; 300]),
        masked(0x81, &[0xce, 0xba, 0xe1, 0xbd, 0xb9]),
    ];
    let upgrade = vec![
        b"Host: 127.0.0.1:8000\r\nOrigin: http://127.0.0.1:8000\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: bearer, a.b.c\r\nCookie: token=x.y.z\r\nX-Forwarded-For: 1.2.3.4, 127.0.0.1\r\n".to_vec(),
        b"token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.sig&room=1".to_vec(),
    ];
    let routes = vec![
        b"/ws/chat/lobby/".to_vec(),
        b"/api/x/y".to_vec(),
        b"/re/123/".to_vec(),
        b"/ws/chat/a%2Fb/".to_vec(),
    ];
    let names = vec![
        b"chat".to_vec(),
        b"specific.abc!def".to_vec(),
        b"a-b_c.d".to_vec(),
    ];
    let msgpack = vec![
        canal::msg! { "type": "chat.message", "text": "hi", "n": 3 }.to_msgpack(),
        canal::msg! { "type": "websocket.send", "bytes": canal::Value::Bytes(vec![0, 1, 2].into()) }
            .to_msgpack(),
    ];
    vec![
        ("websocket_frames", frames),
        ("upgrade_headers", upgrade),
        ("route_matching", routes),
        ("names", names),
        ("msgpack", msgpack),
    ]
}

/// A mutated seed: bit flips, byte changes, insertions, deletions, splices, or pure noise.
fn mutate(seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[fastrand::usize(..seeds.len())].clone();
    for _ in 0..fastrand::usize(1..8) {
        match fastrand::u8(..7) {
            0 if !data.is_empty() => {
                let i = fastrand::usize(..data.len());
                data[i] ^= 1 << fastrand::u8(..8);
            }
            1 if !data.is_empty() => {
                let i = fastrand::usize(..data.len());
                data[i] = fastrand::u8(..);
            }
            2 => {
                let i = fastrand::usize(..=data.len());
                data.insert(i, fastrand::u8(..));
            }
            3 if !data.is_empty() => {
                data.remove(fastrand::usize(..data.len()));
            }
            4 => {
                let other = &seeds[fastrand::usize(..seeds.len())];
                let at = fastrand::usize(..=data.len());
                data.splice(at..at, other.iter().copied());
            }
            5 => {
                data = (0..fastrand::usize(..256))
                    .map(|_| fastrand::u8(..))
                    .collect()
            }
            _ => {
                let i = fastrand::usize(..=data.len());
                data.insert(
                    i,
                    *b"\x00\x80\xff:!/{}%\r\n"
                        .get(fastrand::usize(..11))
                        .unwrap_or(&0),
                );
            }
        }
    }
    data
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    fastrand::seed(seed);
    println!("seed {seed}, {secs} s per target");
    let mut total = 0u64;
    for (name, seeds) in seeds() {
        let start = Instant::now();
        let mut runs = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            for _ in 0..256 {
                let data = mutate(&seeds);
                let text = String::from_utf8_lossy(&data);
                match name {
                    "websocket_frames" => {
                        canal::fuzzing::websocket_frames(&data, fastrand::usize(1..64))
                    }
                    "upgrade_headers" => canal::fuzzing::upgrade_headers(&data),
                    "route_matching" => canal::fuzzing::route_matching(&text),
                    "names" => canal::fuzzing::names(&text),
                    _ => canal::fuzzing::msgpack(&data),
                }
                runs += 1;
            }
        }
        total += runs;
        println!(
            "{name:18} {runs:>12} executions in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    println!("total {total} executions, no property broken");
}
