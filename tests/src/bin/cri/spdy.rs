//! SPDY/3.1 framing, as much of it as a client of Kubernetes'
//! `remotecommand` streaming protocol needs (kubelet's, and containerd 1.6's
//! CRI streaming server, which serves it with `k8s.io/apimachinery`'s
//! `httpstream/spdy` on top of `github.com/moby/spdystream`).
//!
//! Frames (SPDY/3 draft, section 2.2): a control frame starts with the
//! control bit, the version (3) and the type; a data frame with the stream
//! id. Both then carry 8 bits of flags and a 24-bit payload length. FLAG_FIN
//! (0x01) on a DATA frame (or on SYN_STREAM/SYN_REPLY/HEADERS) half-closes
//! the sender's side of the stream: that is how `exec` tells the process its
//! stdin has ended.
//!
//! Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are a count, then
//! length-prefixed lowercase names and values (32-bit lengths in SPDY/3),
//! zlib-compressed as one continuous stream per direction, each block ending
//! with a SYNC_FLUSH so that it decompresses from its own frame's bytes.
//! [`HeaderCompressor`] compresses without SPDY's preset dictionary, so the
//! zlib header's FDICT bit is clear: Go's `zlib.NewReaderDict`, which
//! spdystream uses to read header blocks (`spdy/read.go`,
//! `uncorkHeaderDecompressor`), checks and uses the dictionary only when a
//! stream's header sets FDICT, and reads any other zlib stream as is. The
//! blocks the server sends are never decompressed here (which would need
//! the dictionary): a client knows the ids of the streams it opened, and
//! `remotecommand` puts nothing in its replies.
//!
//! Flow control (SPDY/3.1's 64 KiB initial window per stream, WINDOW_UPDATE)
//! is deliberately not implemented: moby/spdystream enforces none. Checked in
//! containerd v1.6.20's `vendor/github.com/moby/spdystream`: no stream keeps
//! a send or receive window (`stream.go`), WINDOW_UPDATE and SETTINGS frames
//! fall to the default branch of `Connection.Serve` / `frameHandler`
//! ("unhandled frame type", only logged), and spdystream never sends a
//! WINDOW_UPDATE itself. A client honouring the window would stall after
//! 64 KiB of stdin. Back-pressure comes from TCP instead: spdystream hands
//! each DATA frame to the stream's reader over an unbuffered channel and its
//! frame queues block when full, so the server stops reading the socket
//! while the process does not read its stdin.

use std::io::{self, Read};

use flate2::{Compress, Compression, FlushCompress};

/// The SPDY version this speaks.
pub const VERSION: u16 = 3;

/// Control frame types.
pub const SYN_STREAM: u16 = 1;
pub const SYN_REPLY: u16 = 2;
pub const RST_STREAM: u16 = 3;
pub const SETTINGS: u16 = 4;
pub const PING: u16 = 6;
pub const GOAWAY: u16 = 7;
pub const HEADERS: u16 = 8;
pub const WINDOW_UPDATE: u16 = 9;

/// The flag that ends the sender's side of a stream (DATA, SYN_STREAM,
/// SYN_REPLY, HEADERS).
pub const FLAG_FIN: u8 = 0x01;

/// The largest payload a frame's 24-bit length can describe.
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;

/// One frame. Header blocks stay as they travel: compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        flags: u8,
        data: Vec<u8>,
    },
    SynStream {
        stream: u32,
        associated: u32,
        /// 0 (highest) to 7.
        priority: u8,
        flags: u8,
        headers: Vec<u8>,
    },
    SynReply {
        stream: u32,
        flags: u8,
        headers: Vec<u8>,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        /// (flags, id, value) of each setting.
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        flags: u8,
        headers: Vec<u8>,
    },
    WindowUpdate {
        stream: u32,
        delta: u32,
    },
    /// A control frame of a type SPDY/3 does not define, or of another
    /// version: to be ignored.
    Other {
        version: u16,
        kind: u16,
        flags: u8,
        payload: Vec<u8>,
    },
}

const STREAM_ID_MASK: u32 = 0x7fff_ffff;

impl Frame {
    /// The frame as it goes on the wire.
    ///
    /// Panics if the payload is longer than [`MAX_PAYLOAD`]: senders split
    /// their data.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        let (kind, flags) = match self {
            Frame::Data {
                stream,
                flags,
                data,
            } => {
                assert!(
                    data.len() <= MAX_PAYLOAD,
                    "a DATA frame of {} bytes",
                    data.len()
                );
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(stream & STREAM_ID_MASK).to_be_bytes());
                out.extend_from_slice(&length_word(*flags, data.len()).to_be_bytes());
                out.extend_from_slice(data);
                return out;
            }
            Frame::SynStream {
                stream,
                associated,
                priority,
                flags,
                headers,
            } => {
                put32(&mut payload, stream & STREAM_ID_MASK);
                put32(&mut payload, associated & STREAM_ID_MASK);
                payload.push((priority & 0x07) << 5);
                payload.push(0); // the credential slot
                payload.extend_from_slice(headers);
                (SYN_STREAM, *flags)
            }
            Frame::SynReply {
                stream,
                flags,
                headers,
            } => {
                put32(&mut payload, stream & STREAM_ID_MASK);
                payload.extend_from_slice(headers);
                (SYN_REPLY, *flags)
            }
            Frame::RstStream { stream, status } => {
                put32(&mut payload, stream & STREAM_ID_MASK);
                put32(&mut payload, *status);
                (RST_STREAM, 0)
            }
            Frame::Settings { flags, entries } => {
                put32(&mut payload, entries.len() as u32);
                for &(flags, id, value) in entries {
                    put32(&mut payload, (u32::from(flags) << 24) | (id & 0x00ff_ffff));
                    put32(&mut payload, value);
                }
                (SETTINGS, *flags)
            }
            Frame::Ping { id } => {
                put32(&mut payload, *id);
                (PING, 0)
            }
            Frame::GoAway { last_good, status } => {
                put32(&mut payload, last_good & STREAM_ID_MASK);
                put32(&mut payload, *status);
                (GOAWAY, 0)
            }
            Frame::Headers {
                stream,
                flags,
                headers,
            } => {
                put32(&mut payload, stream & STREAM_ID_MASK);
                payload.extend_from_slice(headers);
                (HEADERS, *flags)
            }
            Frame::WindowUpdate { stream, delta } => {
                put32(&mut payload, stream & STREAM_ID_MASK);
                put32(&mut payload, delta & 0x7fff_ffff);
                (WINDOW_UPDATE, 0)
            }
            Frame::Other {
                version,
                kind,
                flags,
                payload: raw,
            } => {
                assert!(raw.len() <= MAX_PAYLOAD);
                let mut out = Vec::with_capacity(8 + raw.len());
                let first = 0x8000_0000 | (u32::from(version & 0x7fff) << 16) | u32::from(*kind);
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&length_word(*flags, raw.len()).to_be_bytes());
                out.extend_from_slice(raw);
                return out;
            }
        };
        assert!(
            payload.len() <= MAX_PAYLOAD,
            "a control frame of {} bytes",
            payload.len()
        );
        let mut out = Vec::with_capacity(8 + payload.len());
        let first = 0x8000_0000 | (u32::from(VERSION) << 16) | u32::from(kind);
        out.extend_from_slice(&first.to_be_bytes());
        out.extend_from_slice(&length_word(flags, payload.len()).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Reads one frame; `None` at a clean end of the input (between frames).
    pub fn read(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        // A clean end only before the first byte of a frame.
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a SPDY frame header",
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let word = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let flags = (word >> 24) as u8;
        let length = (word & 0x00ff_ffff) as usize;
        let mut payload = vec![0u8; length];
        r.read_exact(&mut payload)?;
        if first & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream: first & STREAM_ID_MASK,
                flags,
                data: payload,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        let kind = (first & 0xffff) as u16;
        if version != VERSION {
            return Ok(Some(Frame::Other {
                version,
                kind,
                flags,
                payload,
            }));
        }
        Self::control(kind, flags, payload).map(Some)
    }

    fn control(kind: u16, flags: u8, payload: Vec<u8>) -> io::Result<Frame> {
        let need = |n: usize| {
            if payload.len() < n {
                Err(invalid(format!(
                    "a SPDY control frame of type {kind} with {} bytes of payload",
                    payload.len()
                )))
            } else {
                Ok(())
            }
        };
        let word = |i: usize| get32(&payload, i);
        Ok(match kind {
            SYN_STREAM => {
                need(10)?;
                Frame::SynStream {
                    stream: word(0) & STREAM_ID_MASK,
                    associated: word(4) & STREAM_ID_MASK,
                    priority: payload[8] >> 5,
                    flags,
                    headers: payload[10..].to_vec(),
                }
            }
            SYN_REPLY => {
                need(4)?;
                Frame::SynReply {
                    stream: word(0) & STREAM_ID_MASK,
                    flags,
                    headers: payload[4..].to_vec(),
                }
            }
            RST_STREAM => {
                need(8)?;
                Frame::RstStream {
                    stream: word(0) & STREAM_ID_MASK,
                    status: word(4),
                }
            }
            SETTINGS => {
                need(4)?;
                let count = word(0) as usize;
                need(4 + count.saturating_mul(8))?;
                let entries = (0..count)
                    .map(|i| {
                        let id = word(4 + 8 * i);
                        ((id >> 24) as u8, id & 0x00ff_ffff, word(8 + 8 * i))
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            PING => {
                need(4)?;
                Frame::Ping { id: word(0) }
            }
            GOAWAY => {
                need(4)?;
                Frame::GoAway {
                    last_good: word(0) & STREAM_ID_MASK,
                    // SPDY/2 had no status; be lenient.
                    status: if payload.len() >= 8 { word(4) } else { 0 },
                }
            }
            HEADERS => {
                need(4)?;
                Frame::Headers {
                    stream: word(0) & STREAM_ID_MASK,
                    flags,
                    headers: payload[4..].to_vec(),
                }
            }
            WINDOW_UPDATE => {
                need(8)?;
                Frame::WindowUpdate {
                    stream: word(0) & STREAM_ID_MASK,
                    delta: word(4) & 0x7fff_ffff,
                }
            }
            _ => Frame::Other {
                version: VERSION,
                kind,
                flags,
                payload,
            },
        })
    }
}

fn length_word(flags: u8, length: usize) -> u32 {
    (u32::from(flags) << 24) | (length as u32 & 0x00ff_ffff)
}

fn put32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// The big-endian word at `at` (the caller checked the length).
fn get32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A header block before compression: the number of pairs, then each name
/// (lowercased, as SPDY requires) and value with 32-bit lengths.
pub fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    put32(&mut out, headers.len() as u32);
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        put32(&mut out, name.len() as u32);
        out.extend_from_slice(name.as_bytes());
        put32(&mut out, value.len() as u32);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// One direction's header compression context: every block this sender
/// puts in a frame goes through the same zlib stream.
pub struct HeaderCompressor {
    zlib: Compress,
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        HeaderCompressor {
            zlib: Compress::new(Compression::default(), true),
        }
    }
}

impl HeaderCompressor {
    /// `headers` as the compressed block of the next frame, ending with a
    /// SYNC_FLUSH so the receiver can decompress it from this frame alone.
    pub fn compress(&mut self, headers: &[(&str, &str)]) -> io::Result<Vec<u8>> {
        let input = header_block(headers);
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(input.len() + 64);
            }
            let before = self.zlib.total_in();
            self.zlib
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| io::Error::other(format!("compressing a header block: {e}")))?;
            consumed += (self.zlib.total_in() - before) as usize;
            // The flush is complete when all input went in and the
            // compressor stopped short of filling the space it had.
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// The receiving side of a header compression context (without the
    /// preset dictionary, which our sender does not use).
    struct HeaderDecompressor {
        zlib: Decompress,
    }

    impl HeaderDecompressor {
        fn new() -> Self {
            HeaderDecompressor {
                zlib: Decompress::new(true),
            }
        }

        /// Decompresses one frame's block, from that frame's bytes alone.
        fn decompress(&mut self, block: &[u8]) -> Vec<(String, String)> {
            let mut out = Vec::with_capacity(4096);
            let mut consumed = 0;
            loop {
                let before = self.zlib.total_in();
                self.zlib
                    .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync)
                    .unwrap();
                consumed += (self.zlib.total_in() - before) as usize;
                if consumed == block.len() && out.len() < out.capacity() {
                    break;
                }
                out.reserve(4096);
            }
            parse_block(&out)
        }
    }

    fn parse_block(block: &[u8]) -> Vec<(String, String)> {
        let mut at = 4;
        let text = |at: &mut usize| {
            let n = get32(block, *at) as usize;
            let s = String::from_utf8(block[*at + 4..*at + 4 + n].to_vec()).unwrap();
            *at += 4 + n;
            s
        };
        let pairs = (0..get32(block, 0))
            .map(|_| (text(&mut at), text(&mut at)))
            .collect();
        assert_eq!(at, block.len(), "trailing bytes in the block");
        pairs
    }

    fn decode(bytes: &[u8]) -> Frame {
        let mut r = bytes;
        let frame = Frame::read(&mut r).unwrap().unwrap();
        assert!(r.is_empty(), "{} bytes left after {frame:?}", r.len());
        frame
    }

    #[test]
    fn data_frames_and_the_half_close() {
        let frame = Frame::Data {
            stream: 3,
            flags: 0,
            data: b"hello".to_vec(),
        };
        let bytes = frame.encode();
        assert_eq!(bytes[..8], [0, 0, 0, 3, 0, 0, 0, 5]);
        assert_eq!(&bytes[8..], b"hello");
        assert_eq!(decode(&bytes), frame);

        // Half-closing stdin: an empty DATA frame with FLAG_FIN.
        let fin = Frame::Data {
            stream: 3,
            flags: FLAG_FIN,
            data: Vec::new(),
        };
        assert_eq!(fin.encode(), [0, 0, 0, 3, 1, 0, 0, 0]);
        assert_eq!(decode(&fin.encode()), fin);

        let big = Frame::Data {
            stream: 0x7fff_fffd,
            flags: FLAG_FIN,
            data: vec![0xa5; 70_000],
        };
        let bytes = big.encode();
        assert_eq!(bytes[..8], [0x7f, 0xff, 0xff, 0xfd, 1, 0x01, 0x11, 0x70]);
        assert_eq!(decode(&bytes), big);
    }

    #[test]
    fn control_frames_round_trip() {
        let frames = [
            Frame::SynStream {
                stream: 5,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: vec![1, 2, 3],
            },
            Frame::SynStream {
                stream: 7,
                associated: 1,
                priority: 7,
                flags: FLAG_FIN,
                headers: Vec::new(),
            },
            Frame::SynReply {
                stream: 5,
                flags: FLAG_FIN,
                headers: vec![9; 20],
            },
            Frame::RstStream {
                stream: 5,
                status: 5,
            },
            Frame::Settings {
                flags: 1,
                entries: vec![(1, 7, 65536), (0, 4, 100)],
            },
            Frame::Ping { id: 2 },
            Frame::GoAway {
                last_good: 7,
                status: 0,
            },
            Frame::Headers {
                stream: 9,
                flags: 0,
                headers: vec![4; 3],
            },
            Frame::WindowUpdate {
                stream: 3,
                delta: 65536,
            },
            Frame::Other {
                version: 3,
                kind: 10,
                flags: 0,
                payload: vec![1, 2],
            },
        ];
        for frame in frames {
            assert_eq!(decode(&frame.encode()), frame);
        }
    }

    #[test]
    fn control_frame_layout() {
        // PING 2: control bit, version 3, type 6; no flags, length 4.
        assert_eq!(
            Frame::Ping { id: 2 }.encode(),
            [0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 2]
        );
        // SYN_STREAM 1 with FIN and priority 2: ids, then priority in the
        // top 3 bits, the slot, the header block.
        let bytes = Frame::SynStream {
            stream: 1,
            associated: 0,
            priority: 2,
            flags: FLAG_FIN,
            headers: vec![0xaa, 0xbb],
        }
        .encode();
        assert_eq!(
            bytes,
            [0x80, 0x03, 0x00, 0x01, 0x01, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0x40, 0, 0xaa, 0xbb]
        );
        assert_eq!(
            Frame::WindowUpdate {
                stream: 1,
                delta: 0x10000
            }
            .encode(),
            [0x80, 0x03, 0x00, 0x09, 0, 0, 0, 8, 0, 0, 0, 1, 0, 1, 0, 0]
        );
    }

    #[test]
    fn reading_stops_cleanly_only_between_frames() {
        let mut empty: &[u8] = &[];
        assert!(Frame::read(&mut empty).unwrap().is_none());
        let bytes = Frame::Ping { id: 1 }.encode();
        for cut in 1..bytes.len() {
            let mut r = &bytes[..cut];
            let e = Frame::read(&mut r).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        // Two frames back to back, then the end.
        let mut two = Frame::Ping { id: 1 }.encode();
        two.extend(
            Frame::Data {
                stream: 1,
                flags: FLAG_FIN,
                data: vec![],
            }
            .encode(),
        );
        let mut r = &two[..];
        assert_eq!(Frame::read(&mut r).unwrap(), Some(Frame::Ping { id: 1 }));
        assert!(matches!(
            Frame::read(&mut r).unwrap(),
            Some(Frame::Data {
                stream: 1,
                flags: FLAG_FIN,
                ..
            })
        ));
        assert!(Frame::read(&mut r).unwrap().is_none());
    }

    #[test]
    fn short_control_frames_are_errors() {
        // RST_STREAM with 4 bytes of payload instead of 8.
        let mut r: &[u8] = &[0x80, 0x03, 0x00, 0x03, 0, 0, 0, 4, 0, 0, 0, 1];
        let e = Frame::read(&mut r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn header_blocks() {
        let block = header_block(&[("StreamType", "stdin"), ("a", "")]);
        assert_eq!(
            block,
            [
                0, 0, 0, 2, // two pairs
                0, 0, 0, 10, b's', b't', b'r', b'e', b'a', b'm', b't', b'y', b'p', b'e', //
                0, 0, 0, 5, b's', b't', b'd', b'i', b'n', //
                0, 0, 0, 1, b'a', 0, 0, 0, 0,
            ]
        );
        assert_eq!(
            parse_block(&block),
            [
                ("streamtype".into(), "stdin".into()),
                ("a".into(), "".into())
            ]
        );
    }

    /// Consecutive blocks share one zlib stream, and each decompresses from
    /// its own frame's bytes alone (what spdystream's reader relies on);
    /// the stream's header announces no preset dictionary.
    #[test]
    fn header_compression_is_one_stream_flushed_per_frame() {
        let mut compressor = HeaderCompressor::default();
        let mut decompressor = HeaderDecompressor::new();
        let kinds = ["error", "stdin", "stdout", "stderr", "resize", "stdout"];
        let mut sizes = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let block = compressor.compress(&[("streamtype", kind)]).unwrap();
            if i == 0 {
                assert_eq!(block[0] & 0x0f, 8, "zlib header: deflate");
                assert_eq!(u16::from_be_bytes([block[0], block[1]]) % 31, 0, "FCHECK");
                assert_eq!(block[1] & 0x20, 0, "FDICT must be clear");
            }
            // SYNC_FLUSH ends with an empty stored block.
            assert_eq!(block[block.len() - 4..], [0, 0, 0xff, 0xff]);
            sizes.push(block.len());
            let frame = Frame::SynStream {
                stream: 2 * i as u32 + 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: block,
            };
            let Frame::SynStream { headers, .. } = decode(&frame.encode()) else {
                unreachable!()
            };
            assert_eq!(
                decompressor.decompress(&headers),
                [("streamtype".to_string(), kind.to_string())]
            );
        }
        // The shared context pays off: the repeated block is smaller.
        assert!(sizes[5] < sizes[0], "{sizes:?}");
    }
}
