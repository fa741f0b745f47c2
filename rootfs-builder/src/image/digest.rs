//! Content digests: parsing `algorithm:hex`, hashing while reading, and
//! containerd-style chain IDs over layer diff IDs.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256, Sha512};

/// A validated `sha256:<64 hex>` or `sha512:<128 hex>` digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlobDigest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

impl BlobDigest {
    /// Parses `sha256:...` or `sha512:...`; anything else is an error
    /// message (unsupported algorithm or malformed hex).
    pub fn parse(s: &str) -> Result<BlobDigest, String> {
        let (algorithm, hex) = s
            .split_once(':')
            .ok_or_else(|| format!("digest {s:?} has no algorithm prefix"))?;
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(format!("digest {s:?}: unsupported algorithm {other:?}")),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "digest {s:?}: expected {} lowercase hex digits",
                algorithm.hex_len()
            ));
        }
        Ok(BlobDigest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Where an OCI layout keeps this blob: `blobs/<alg>/<hex>`.
    pub fn blob_path(&self) -> String {
        format!("blobs/{}/{}", self.algorithm.name(), self.hex)
    }
}

impl std::fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

/// Hashes (and counts) everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, algorithm: Algorithm) -> Self {
        let hasher = match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        };
        HashingReader {
            inner,
            hasher,
            count: 0,
        }
    }

    /// Reads the rest of the stream (so that the digest covers all of it).
    pub fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(drop)
    }

    /// The digest (`alg:hex`) and the byte count of what was read.
    pub fn finish(self) -> (String, u64) {
        let digest = match self.hasher {
            Hasher::Sha256(h) => format!("sha256:{:x}", h.finalize()),
            Hasher::Sha512(h) => format!("sha512:{:x}", h.finalize()),
        };
        (digest, self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match &mut self.hasher {
            Hasher::Sha256(h) => h.update(&buf[..n]),
            Hasher::Sha512(h) => h.update(&buf[..n]),
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// The digest of a byte string, `alg:hex`.
pub fn digest_of(algorithm: Algorithm, data: &[u8]) -> String {
    match algorithm {
        Algorithm::Sha256 => format!("sha256:{:x}", Sha256::digest(data)),
        Algorithm::Sha512 => format!("sha512:{:x}", Sha512::digest(data)),
    }
}

/// The chain ID of a stack of layers, as containerd and the OCI image spec
/// define it: the first layer's diff ID, then
/// `sha256(parent_chain_id + " " + diff_id)` for each layer above. It names
/// the unpacked result of exactly these layers in this order, however they
/// were compressed. `None` for an image with no layers.
pub fn chain_id<'a>(diff_ids: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut chain: Option<String> = None;
    for diff_id in diff_ids {
        chain = Some(match chain {
            None => diff_id.to_string(),
            Some(parent) => digest_of(Algorithm::Sha256, format!("{parent} {diff_id}").as_bytes()),
        });
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_digests() {
        let hex = "a".repeat(64);
        let d = BlobDigest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(d.blob_path(), format!("blobs/sha256/{hex}"));
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert!(BlobDigest::parse("sha256:abc").is_err());
        assert!(BlobDigest::parse(&format!("md5:{hex}")).is_err());
        assert!(BlobDigest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(BlobDigest::parse(&format!("sha256:../../{}", "a".repeat(58))).is_err());
        assert!(BlobDigest::parse(&hex).is_err());
    }

    #[test]
    fn hashing_reader_matches_digest_of() {
        let data = b"hello layers";
        let mut reader = HashingReader::new(&data[..], Algorithm::Sha256);
        reader.drain().unwrap();
        let (digest, count) = reader.finish();
        assert_eq!(digest, digest_of(Algorithm::Sha256, data));
        assert_eq!(count, data.len() as u64);
        assert_eq!(
            digest_of(Algorithm::Sha256, b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        assert_eq!(chain_id([]), None);
        let a = digest_of(Algorithm::Sha256, b"a");
        let b = digest_of(Algorithm::Sha256, b"b");
        assert_eq!(chain_id([a.as_str()]), Some(a.clone()));
        let expected = digest_of(Algorithm::Sha256, format!("{a} {b}").as_bytes());
        assert_eq!(chain_id([a.as_str(), b.as_str()]), Some(expected));
        assert_ne!(
            chain_id([a.as_str(), b.as_str()]),
            chain_id([b.as_str(), a.as_str()])
        );
    }
}
