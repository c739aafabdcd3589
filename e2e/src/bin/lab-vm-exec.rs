//! Runs commands on the lab's VM nodes (`e2e/lab/lab.sh exec hm-vm-K -- CMD`): the one way in,
//! as `nsenter` is for the namespace nodes.
//!
//! - `lab-vm-exec serve ADDR:PORT TOKEN-FILE` runs in the VM (started by its init): for each
//!   connection it checks the lab's token, runs the command in a process group of its own, and
//!   streams stdin in and stdout, stderr and the exit status out. A connection that goes away
//!   before the command has ended (its client was killed) kills the command's process group.
//! - `lab-vm-exec run ADDR:PORT TOKEN-FILE [--timeout SECS] -- CMD [ARG...]` runs on the host,
//!   inside the lab's bridge namespace `hm-lab` (the only place besides the nodes that reaches the
//!   lab network): it forwards its stdin, prints the command's output and exits with its status
//!   (128 + N for a signal N; 255 when the VM cannot be reached).
//!
//! The protocol is frames of a type byte, a big-endian u32 length and the payload. Client to
//! server: `H` (token, working directory and argv, each NUL-terminated), then `I` (stdin bytes)
//! and `E` (stdin closed). Server to client: `O` (stdout), `R` (stderr), `F` (the command could
//! not start: why) and `X` (exit status, i32).
//!
//! Only the standard library: the same binary runs in the VM with its shared libraries copied in.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const MAX_FRAME: u32 = 16 << 20;

fn write_frame(stream: &Mutex<TcpStream>, kind: u8, data: &[u8]) -> io::Result<()> {
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    let mut stream = stream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    stream.write_all(&header)?;
    stream.write_all(data)
}

fn read_frame(stream: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut data = vec![0; len as usize];
    stream.read_exact(&mut data)?;
    Ok(Some((header[0], data)))
}

fn read_token(path: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

// --- server (in the VM) ----------------------------------------------------------------------

fn serve(addr: &str, token_file: &str) -> io::Result<()> {
    let token = read_token(token_file)?;
    let listener = TcpListener::bind(addr)?;
    eprintln!("lab-vm-exec: serving on {addr}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let token = token.clone();
        thread::spawn(move || {
            if let Err(err) = session(stream, &token) {
                eprintln!("lab-vm-exec: session: {err}");
            }
        });
    }
    Ok(())
}

fn session(mut stream: TcpStream, token: &str) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let Some((b'H', header)) = read_frame(&mut stream)? else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no header"));
    };
    stream.set_read_timeout(None)?;
    let mut parts = header.split(|b| *b == 0).map(|p| String::from_utf8_lossy(p).into_owned());
    let given = parts.next().unwrap_or_default();
    let cwd = parts.next().unwrap_or_default();
    let argv: Vec<String> = parts.filter(|p| !p.is_empty()).collect();
    let out = Arc::new(Mutex::new(stream.try_clone()?));
    if given != token {
        write_frame(&out, b'F', b"lab-vm-exec: wrong token\n")?;
        return Ok(());
    }
    let Some((program, args)) = argv.split_first() else {
        write_frame(&out, b'F', b"lab-vm-exec: no command\n")?;
        return Ok(());
    };
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    if std::path::Path::new(&cwd).is_dir() {
        command.current_dir(&cwd);
    } else {
        command.current_dir("/");
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            write_frame(&out, b'F', format!("lab-vm-exec: {program}: {err}\n").as_bytes())?;
            return Ok(());
        }
    };
    let pgid = child.id();
    let mut pumps = Vec::new();
    for (kind, pipe) in [
        (b'O', child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        (b'R', child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let out = Arc::clone(&out);
        pumps.push(thread::spawn(move || {
            let mut buf = vec![0; 64 << 10];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if write_frame(&out, kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    // Stdin from the client; the client going away kills the command's group.
    let mut stdin = child.stdin.take();
    let mut input = stream;
    let done = Arc::new(AtomicBool::new(false));
    let ended = Arc::clone(&done);
    thread::spawn(move || {
        loop {
            match read_frame(&mut input) {
                Ok(Some((b'I', data))) => {
                    if let Some(pipe) = stdin.as_mut()
                        && pipe.write_all(&data).is_err()
                    {
                        stdin = None;
                    }
                }
                Ok(Some((b'E', _))) => stdin = None,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    if ended.load(Ordering::SeqCst) {
                        return;
                    }
                    // The whole group: a pipeline under `sh -c` dies with its shell.
                    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
                    return;
                }
            }
        }
    });
    let status = child.wait()?;
    done.store(true, Ordering::SeqCst);
    for pump in pumps {
        let _ = pump.join();
    }
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    write_frame(&out, b'X', &code.to_be_bytes())?;
    let stream = out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

// --- client (on the host, in hm-lab) -----------------------------------------------------------

fn run(addr: &str, token_file: &str, timeout: Duration, argv: &[String]) -> io::Result<i32> {
    let token = read_token(token_file)?;
    let target: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no address in {addr}")))?;
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_nodelay(true)?;
    let out = Arc::new(Mutex::new(stream.try_clone()?));
    let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
    let mut header = Vec::new();
    for part in std::iter::once(&token).chain(std::iter::once(&cwd)).chain(argv) {
        header.extend_from_slice(part.as_bytes());
        header.push(0);
    }
    write_frame(&out, b'H', &header)?;
    {
        let out = Arc::clone(&out);
        thread::spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0; 64 << 10];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = write_frame(&out, b'E', &[]);
                        return;
                    }
                    Ok(n) => {
                        if write_frame(&out, b'I', &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut input = stream;
    loop {
        match read_frame(&mut input)? {
            Some((b'O', data)) => {
                let mut stdout = io::stdout().lock();
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            Some((b'R', data)) => io::stderr().write_all(&data)?,
            Some((b'F', data)) => {
                io::stderr().write_all(&data)?;
                return Ok(127);
            }
            Some((b'X', data)) if data.len() == 4 => {
                return Ok(i32::from_be_bytes([data[0], data[1], data[2], data[3]]));
            }
            Some(_) => {}
            None => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the VM closed the connection"));
            }
        }
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: lab-vm-exec serve ADDR:PORT TOKEN-FILE\n       lab-vm-exec run ADDR:PORT TOKEN-FILE [--timeout SECS] -- CMD [ARG...]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() == 3 => match serve(&args[1], &args[2]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("lab-vm-exec serve: {err}");
                ExitCode::FAILURE
            }
        },
        Some("run") if args.len() >= 4 => {
            let mut rest = &args[3..];
            let mut timeout = Duration::from_secs(10);
            if rest.first().map(String::as_str) == Some("--timeout") {
                let Some(secs) = rest.get(1).and_then(|s| s.parse().ok()) else { return usage() };
                timeout = Duration::from_secs(secs);
                rest = &rest[2..];
            }
            if rest.first().map(String::as_str) == Some("--") {
                rest = &rest[1..];
            }
            if rest.is_empty() {
                return usage();
            }
            match run(&args[1], &args[2], timeout, rest) {
                Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
                Err(err) => {
                    eprintln!("lab-vm-exec: {}: {err}", args[1]);
                    ExitCode::from(255)
                }
            }
        }
        _ => usage(),
    }
}
