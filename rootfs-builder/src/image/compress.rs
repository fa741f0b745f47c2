//! Layer decompression, chosen by the stream's magic bytes (media types can
//! lie, and docker-archive layers have none): gzip, zstd or plain tar.

use std::io::{self, BufRead, Read};

use flate2::bufread::MultiGzDecoder;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Wraps `reader` in the decoder its first bytes call for.
pub fn decompress<'a, R: BufRead + 'a>(mut reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = fill_at_least(&mut reader, 4)?;
    if head.starts_with(GZIP_MAGIC) {
        Ok(Box::new(MultiGzDecoder::new(reader)))
    } else if head.starts_with(ZSTD_MAGIC) {
        zstd(reader)
    } else {
        Ok(Box::new(reader))
    }
}

/// Peeks at up to `n` bytes (fewer only at the end of the stream).
fn fill_at_least<R: BufRead>(reader: &mut R, n: usize) -> io::Result<Vec<u8>> {
    let buf = reader.fill_buf()?;
    Ok(buf[..buf.len().min(n)].to_vec())
}

#[cfg(feature = "zstd")]
fn zstd<'a, R: BufRead + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(Box::new(zstd_frames::Frames::new(reader)))
}

#[cfg(not(feature = "zstd"))]
fn zstd<'a, R: BufRead + 'a>(_reader: R) -> io::Result<Box<dyn Read + 'a>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "zstd-compressed layer: rootfs-builder was built without the \"zstd\" feature",
    ))
}

#[cfg(feature = "zstd")]
mod zstd_frames {
    //! A zstd stream may hold several frames (and skippable frames): decode
    //! them one after another until the input ends.

    use std::io::{self, BufRead, Read};

    use ruzstd::decoding::{FrameDecoder, StreamingDecoder};

    /// Skippable frames start with 0x184D2A50..=0x184D2A5F (little-endian).
    fn is_skippable(head: &[u8]) -> bool {
        head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18]
    }

    pub struct Frames<R: BufRead> {
        state: State<R>,
    }

    enum State<R: BufRead> {
        Between(R),
        InFrame(Box<StreamingDecoder<R, FrameDecoder>>),
        Done,
    }

    impl<R: BufRead> Frames<R> {
        pub fn new(reader: R) -> Self {
            Frames {
                state: State::Between(reader),
            }
        }
    }

    fn invalid(e: impl std::fmt::Display) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
    }

    impl<R: BufRead> Read for Frames<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                match std::mem::replace(&mut self.state, State::Done) {
                    State::Done => return Ok(0),
                    State::Between(mut reader) => {
                        let head = reader.fill_buf()?;
                        if head.is_empty() {
                            return Ok(0);
                        }
                        if is_skippable(head) {
                            let mut header = [0u8; 8];
                            reader.read_exact(&mut header)?;
                            let length =
                                u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                            let skipped =
                                io::copy(&mut (&mut reader).take(length.into()), &mut io::sink())?;
                            if skipped != u64::from(length) {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "zstd: truncated skippable frame",
                                ));
                            }
                            self.state = State::Between(reader);
                        } else {
                            self.state = State::InFrame(Box::new(
                                StreamingDecoder::new(reader).map_err(invalid)?,
                            ));
                        }
                    }
                    State::InFrame(mut decoder) => {
                        let n = decoder.read(buf)?;
                        if n > 0 || buf.is_empty() {
                            self.state = State::InFrame(decoder);
                            return Ok(n);
                        }
                        self.state = State::Between(decoder.into_inner());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        decompress(data).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn plain_and_gzip() {
        let payload = b"some tar bytes, really".repeat(100);
        assert_eq!(roundtrip(&payload), payload);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&payload).unwrap();
        assert_eq!(roundtrip(&gz.finish().unwrap()), payload);
        assert_eq!(roundtrip(b""), b"");
    }

    #[test]
    fn truncated_gzip_fails() {
        let payload = b"0123456789".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&payload).unwrap();
        let bytes = gz.finish().unwrap();
        let mut out = Vec::new();
        let result = decompress(&bytes[..bytes.len() / 2])
            .unwrap()
            .read_to_end(&mut out);
        assert!(result.is_err());
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn zstd_multi_frame() {
        use ruzstd::encoding::{compress_to_vec, CompressionLevel};
        let a = b"first frame ".repeat(50);
        let b = b"second frame ".repeat(50);
        let mut bytes = compress_to_vec(&a[..], CompressionLevel::Fastest);
        // A skippable frame between the two.
        bytes.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        bytes.extend(compress_to_vec(&b[..], CompressionLevel::Fastest));
        let mut expected = a.clone();
        expected.extend_from_slice(&b);
        assert_eq!(roundtrip(&bytes), expected);
    }
}
