//! `netbench`: a tiny TCP benchmark for the pod network benchmark (std only,
//! built static so it runs bind-mounted in a busybox container).
//!
//! ```text
//! netbench serve PORT
//! netbench client IP PORT --throughput SECS
//! netbench client IP PORT --latency N [--warmup W]
//! ```
//!
//! The server takes each connection on a thread of its own; the client's
//! first byte says what it wants:
//! - `s` (sink): the server reads until the client half-closes, then
//!   replies with the number of bytes it read (decimal, a newline);
//! - `e` (echo): `TCP_NODELAY`, every byte read is written back at once.
//!
//! The client prints one line of `key=value` words:
//! - `throughput bytes=B seconds=S mb_per_s=M` (MB = 10^6 bytes; the time
//!   runs from the first write until the server's count arrives, and the
//!   bytes are the server's count);
//! - `latency n=N p50_us=A p99_us=B min_us=C max_us=D mean_us=E` (one-byte
//!   round trips after W, default 100, unmeasured ones).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: netbench serve PORT\n       \
    netbench client IP PORT --throughput SECS\n       \
    netbench client IP PORT --latency N [--warmup W]";

/// The size of one write of the throughput client and one read of the sink.
const CHUNK: usize = 128 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", port] => port
            .parse()
            .map_err(|e| format!("port {port:?}: {e}"))
            .and_then(|port| serve(port).map_err(|e| format!("serving: {e}"))),
        ["client", ip, port, rest @ ..] => client(ip, port, rest),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    eprintln!("netbench: serving on port {port}");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = connection(stream) {
                        eprintln!("netbench: connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("netbench: accept: {e}"),
        }
    }
    Ok(())
}

fn connection(mut stream: TcpStream) -> io::Result<()> {
    let mut kind = [0u8; 1];
    stream.read_exact(&mut kind)?;
    match kind[0] {
        b's' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total: u64 = 0;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            stream.write_all(format!("{total}\n").as_bytes())?;
            stream.shutdown(Shutdown::Write)
        }
        b'e' => {
            stream.set_nodelay(true)?;
            let mut byte = [0u8; 1];
            loop {
                match stream.read(&mut byte) {
                    Ok(0) => return Ok(()),
                    Ok(_) => stream.write_all(&byte)?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown request {other:#x}"),
        )),
    }
}

fn client(ip: &str, port: &str, rest: &[&str]) -> Result<(), String> {
    let port: u16 = port.parse().map_err(|e| format!("port {port:?}: {e}"))?;
    let number =
        |text: &str| -> Result<u64, String> { text.parse().map_err(|e| format!("{text:?}: {e}")) };
    let connect = || {
        let addr = (ip, port);
        TcpStream::connect(addr).map_err(|e| format!("connecting to {ip}:{port}: {e}"))
    };
    match rest {
        ["--throughput", secs] => {
            let secs = number(secs)?;
            let (bytes, elapsed) =
                throughput(connect()?, Duration::from_secs(secs)).map_err(|e| e.to_string())?;
            let seconds = elapsed.as_secs_f64();
            println!(
                "throughput bytes={bytes} seconds={seconds:.3} mb_per_s={:.1}",
                bytes as f64 / seconds / 1e6
            );
            Ok(())
        }
        ["--latency", n] | ["--latency", n, "--warmup", _] => {
            let n = number(n)? as usize;
            let warmup = match rest {
                [_, _, _, w] => number(w)? as usize,
                _ => 100,
            };
            if n == 0 {
                return Err("--latency needs at least one round trip".into());
            }
            let mut samples = latency(connect()?, warmup, n).map_err(|e| e.to_string())?;
            samples.sort_by(f64::total_cmp);
            let pick =
                |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            println!(
                "latency n={n} p50_us={:.1} p99_us={:.1} min_us={:.1} max_us={:.1} mean_us={mean:.1}",
                pick(0.5),
                pick(0.99),
                samples[0],
                samples[samples.len() - 1]
            );
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    }
}

/// Writes for `duration`, half-closes, and waits for the server's count:
/// (bytes the server read, time from the first write to its answer).
fn throughput(mut stream: TcpStream, duration: Duration) -> io::Result<(u64, Duration)> {
    let buf = vec![0x5au8; CHUNK];
    stream.write_all(b"s")?;
    let started = Instant::now();
    let mut sent: u64 = 0;
    while started.elapsed() < duration {
        stream.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    let elapsed = started.elapsed();
    let received: u64 = answer.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the server answered {answer:?}: {e}"),
        )
    })?;
    if received != sent {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sent {sent} bytes, the server read {received}"),
        ));
    }
    Ok((received, elapsed))
}

/// One-byte round trips: `warmup` unmeasured, then `n` measured, in µs.
fn latency(mut stream: TcpStream, warmup: usize, n: usize) -> io::Result<Vec<f64>> {
    stream.set_nodelay(true)?;
    stream.write_all(b"e")?;
    let mut samples = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for i in 0..warmup + n {
        let started = Instant::now();
        stream.write_all(&[i as u8])?;
        stream.read_exact(&mut byte)?;
        let micros = started.elapsed().as_secs_f64() * 1e6;
        if byte[0] != i as u8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sent {:#x}, got back {:#x}", i as u8, byte[0]),
            ));
        }
        if i >= warmup {
            samples.push(micros);
        }
    }
    stream.shutdown(Shutdown::Both)?;
    Ok(samples)
}
