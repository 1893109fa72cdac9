//! Cluster-key authentication for host-to-host TCP connections (the page
//! server and the daemons' control channel).
//!
//! Every host of a cluster holds the same secret, the *cluster key* (a file
//! of hex text, mode 0600). A connection starts with a challenge-response
//! handshake in which both sides prove they hold the key without sending it:
//!
//! ```text
//! server -> client  HELLO    b"SFAUTH1\0" || ns            (8 + 32 bytes)
//! client -> server  RESPONSE nc || HMAC(key, "client" || ns || nc)   (32 + 32)
//! server -> client  CONFIRM  1 || HMAC(key, "server" || ns || nc)    (1 + 32)
//!                   or [0; 33] (rejected), or the server just closes
//! ```
//!
//! `ns` and `nc` are fresh random nonces, so a recorded handshake cannot be
//! replayed, and the different labels keep one side's proof from being
//! reflected as the other's. MACs are HMAC-SHA256 and are compared in
//! constant time.
//!
//! This authenticates the peers only: what follows the handshake is neither
//! encrypted nor integrity protected. Run clusters on a trusted network (or
//! under a VPN such as WireGuard).
//!
//! The handshake types are sans-IO (bytes in, bytes out) so that async code
//! can drive them; [`server_blocking`] and [`client_blocking`] drive them on
//! std streams.

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
#[cfg(feature = "tokio")]
use tokio::io::{AsyncRead, AsyncWrite};

/// Size of the server's HELLO: magic + server nonce.
pub const HELLO_LEN: usize = 40;
/// Size of the client's RESPONSE: client nonce + client MAC.
pub const RESPONSE_LEN: usize = 64;
/// Size of the server's CONFIRM: status byte + server MAC.
pub const CONFIRM_LEN: usize = 33;
/// What a server may send instead of a CONFIRM when it rejects the client.
pub const REJECT: [u8; CONFIRM_LEN] = [0; CONFIRM_LEN];
/// Shortest accepted cluster key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

const MAGIC: &[u8; 8] = b"SFAUTH1\0";
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;

/// Errors of loading a key or of a handshake.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file could not be read.
    #[error("cannot read cluster key file {path}")]
    KeyFileRead {
        path: String,
        #[source]
        err: io::Error,
    },
    /// Group or others may read the key file.
    #[error(
        "cluster key file {path} is accessible by group or others (mode {mode:04o}); \
         it must be private: run `chmod 600 {path}`"
    )]
    KeyFilePermissions { path: String, mode: u32 },
    /// The key file does not hold hex text.
    #[error("cluster key file {path} is malformed: {reason} (expected hex text, e.g. from `openssl rand -hex 32`)")]
    KeyFileMalformed { path: String, reason: String },
    /// The key is shorter than [`MIN_KEY_LEN`] bytes.
    #[error(
        "cluster key is too short: {len} bytes, at least {MIN_KEY_LEN} needed (32 recommended)"
    )]
    KeyTooShort { len: usize },
    /// The peer's first message is not a snowflock handshake.
    #[error(
        "malformed handshake: the peer is not a snowflock host or speaks another protocol version"
    )]
    Malformed,
    /// Server side: the client's proof is wrong.
    #[error("peer failed cluster-key authentication (wrong key?)")]
    PeerFailed,
    /// Client side: the server refused our proof.
    #[error("server rejected our cluster key (wrong key?)")]
    Rejected,
    /// Client side: the server's proof is wrong.
    #[error("server did not prove it holds the cluster key")]
    ServerNotProven,
    /// Client side: the server closed the connection during the handshake
    /// (it refused us, or has too many connections).
    #[error("server closed the connection during authentication (wrong key, or it is overloaded)")]
    ClosedByServer,
    /// The connection failed during the handshake.
    #[error("I/O error during cluster-key authentication")]
    Io(#[from] io::Error),
}

/// The cluster's shared secret.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} secret bytes>)", self.0.len())
    }
}

/// Why key text is not hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum HexError {
    #[error("odd number of hex digits")]
    OddLength,
    #[error("not a hex digit")]
    NotHex,
}

fn hex_decode(text: &str) -> Result<Vec<u8>, HexError> {
    let t = text.as_bytes();
    if t.len() % 2 == 1 {
        return Err(HexError::OddLength);
    }
    let digit = |c: u8| -> Result<u8, HexError> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(HexError::NotHex),
        }
    };
    t.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

impl ClusterKey {
    /// Loads a key file: hex text (surrounding whitespace ignored) of at
    /// least [`MIN_KEY_LEN`] bytes, readable by its owner only.
    pub fn load(path: &Path) -> Result<ClusterKey, AuthError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read_err = |err| AuthError::KeyFileRead {
            path: shown.clone(),
            err,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthError::KeyFilePermissions { path: shown, mode });
        }
        let text = std::fs::read_to_string(path).map_err(|err| {
            if err.kind() == io::ErrorKind::InvalidData {
                AuthError::KeyFileMalformed {
                    path: shown.clone(),
                    reason: "not text".into(),
                }
            } else {
                read_err(err)
            }
        })?;
        let bytes = hex_decode(text.trim()).map_err(|e| AuthError::KeyFileMalformed {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        ClusterKey::from_bytes(&bytes)
    }

    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(b: &[u8]) -> Result<ClusterKey, AuthError> {
        if b.len() < MIN_KEY_LEN {
            return Err(AuthError::KeyTooShort { len: b.len() });
        }
        Ok(ClusterKey(b.to_vec()))
    }

    /// A new random 32-byte key.
    pub fn generate() -> ClusterKey {
        let mut b = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        ClusterKey(b)
    }

    /// The key as lowercase hex, the key file format.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A key derived from this one for another use: HMAC-SHA256 of
    /// `label` under the cluster key. Protocols that MAC bulk data (the
    /// multicast page datagrams) use a subkey, so the cluster key itself
    /// keys only the handshake.
    pub fn subkey(&self, label: &[u8]) -> [u8; 32] {
        let mut m =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"snowflock subkey:");
        m.update(label);
        m.finalize().into_bytes().into()
    }

    fn mac(&self, label: &[u8], ns: &[u8], nc: &[u8]) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(ns);
        m.update(nc);
        m
    }
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// Server side of a handshake.
pub struct ServerHandshake {
    ns: [u8; NONCE_LEN],
}

impl fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerHandshake")
    }
}

impl ServerHandshake {
    /// Starts a handshake: send the returned HELLO to the client.
    pub fn new() -> (ServerHandshake, [u8; HELLO_LEN]) {
        let ns = nonce();
        let mut hello = [0u8; HELLO_LEN];
        hello[..8].copy_from_slice(MAGIC);
        hello[8..].copy_from_slice(&ns);
        (ServerHandshake { ns }, hello)
    }

    /// Checks the client's RESPONSE. `Ok` holds the CONFIRM to send; on
    /// `Err` send [`REJECT`] (or nothing) and close the connection.
    pub fn check(
        &self,
        key: &ClusterKey,
        response: &[u8; RESPONSE_LEN],
    ) -> Result<[u8; CONFIRM_LEN], AuthError> {
        let (nc, tag) = response.split_at(NONCE_LEN);
        key.mac(b"client", &self.ns, nc)
            .verify_slice(tag)
            .map_err(|_| AuthError::PeerFailed)?;
        let mut confirm = [0u8; CONFIRM_LEN];
        confirm[0] = 1;
        confirm[1..].copy_from_slice(&key.mac(b"server", &self.ns, nc).finalize().into_bytes());
        Ok(confirm)
    }
}

/// Client side of a handshake.
pub struct ClientHandshake {
    ns: [u8; NONCE_LEN],
    nc: [u8; NONCE_LEN],
}

impl fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientHandshake")
    }
}

impl ClientHandshake {
    /// Answers the server's HELLO: send the returned RESPONSE, then read a
    /// CONFIRM and pass it to [`ClientHandshake::check_confirm`].
    /// Fails if the HELLO is malformed.
    pub fn respond(
        key: &ClusterKey,
        hello: &[u8; HELLO_LEN],
    ) -> Result<(ClientHandshake, [u8; RESPONSE_LEN]), AuthError> {
        if &hello[..8] != MAGIC {
            return Err(AuthError::Malformed);
        }
        let mut ns = [0u8; NONCE_LEN];
        ns.copy_from_slice(&hello[8..]);
        let nc = nonce();
        let mut response = [0u8; RESPONSE_LEN];
        response[..NONCE_LEN].copy_from_slice(&nc);
        response[NONCE_LEN..]
            .copy_from_slice(&key.mac(b"client", &ns, &nc).finalize().into_bytes());
        Ok((ClientHandshake { ns, nc }, response))
    }

    /// Checks the server's CONFIRM: it accepted us and holds the key.
    pub fn check_confirm(
        &self,
        key: &ClusterKey,
        confirm: &[u8; CONFIRM_LEN],
    ) -> Result<(), AuthError> {
        match confirm[0] {
            1 => {}
            0 => return Err(AuthError::Rejected),
            _ => return Err(AuthError::Malformed),
        }
        debug_assert_eq!(confirm.len() - 1, MAC_LEN);
        key.mac(b"server", &self.ns, &self.nc)
            .verify_slice(&confirm[1..])
            .map_err(|_| AuthError::ServerNotProven)
    }
}

impl ServerHandshake {
    /// What the server sends after reading `response`, and the outcome:
    /// the CONFIRM and `Ok`, or [`REJECT`] and the error. Both drivers
    /// ([`server_blocking`], [`server_async`]) send the bytes, then return
    /// the outcome (a failed send of a REJECT is ignored).
    fn reply(
        &self,
        key: &ClusterKey,
        response: &[u8; RESPONSE_LEN],
    ) -> ([u8; CONFIRM_LEN], Result<(), AuthError>) {
        match self.check(key, response) {
            Ok(confirm) => (confirm, Ok(())),
            Err(e) => (REJECT, Err(e)),
        }
    }
}

/// Client side: how a failed read of the server's HELLO or CONFIRM is
/// reported. The end of the stream or a reset means the server hung up on
/// us (see [`AuthError::ClosedByServer`]).
fn client_read_error(e: io::Error) -> AuthError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => AuthError::ClosedByServer,
        _ => AuthError::Io(e),
    }
}

/// Runs the server side on a blocking stream. Set the stream's timeouts
/// first. On failure a [`REJECT`] is sent (best effort); close the stream.
///
/// Messages: write HELLO, read RESPONSE ([`RESPONSE_LEN`] bytes), write
/// CONFIRM or [`REJECT`]. Errors: [`AuthError::Io`] when the stream fails
/// or ends early, [`AuthError::PeerFailed`] when the client's proof is
/// wrong.
pub fn server_blocking<S: Read + Write>(s: &mut S, key: &ClusterKey) -> Result<(), AuthError> {
    let (hs, hello) = ServerHandshake::new();
    s.write_all(&hello)?;
    s.flush()?;
    let mut response = [0u8; RESPONSE_LEN];
    s.read_exact(&mut response)?;
    let (reply, outcome) = hs.reply(key, &response);
    let sent = s.write_all(&reply).and_then(|_| s.flush());
    outcome?;
    Ok(sent?)
}

/// Runs the client side on a blocking stream. Set the stream's timeouts
/// first.
///
/// Messages: read HELLO ([`HELLO_LEN`] bytes), write RESPONSE, read CONFIRM
/// ([`CONFIRM_LEN`] bytes). Errors: [`AuthError::ClosedByServer`] when the
/// server ends the stream (or resets it) before a whole HELLO or CONFIRM,
/// [`AuthError::Malformed`] for a HELLO without the magic or a CONFIRM
/// with a status other than 0 or 1, [`AuthError::Rejected`],
/// [`AuthError::ServerNotProven`], [`AuthError::Io`] otherwise.
pub fn client_blocking<S: Read + Write>(s: &mut S, key: &ClusterKey) -> Result<(), AuthError> {
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).map_err(client_read_error)?;
    let (hs, response) = ClientHandshake::respond(key, &hello)?;
    s.write_all(&response)?;
    s.flush()?;
    let mut confirm = [0u8; CONFIRM_LEN];
    s.read_exact(&mut confirm).map_err(client_read_error)?;
    hs.check_confirm(key, &confirm)
}

/// The server side on a tokio stream: the same messages, lengths and
/// errors as [`server_blocking`] (a [`REJECT`] is sent on failure, best
/// effort; close the stream). It sets no timeout of its own: wrap it in
/// `tokio::time::timeout`, as the blocking one needs stream timeouts.
#[cfg(feature = "tokio")]
pub async fn server_async<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
) -> Result<(), AuthError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (hs, hello) = ServerHandshake::new();
    s.write_all(&hello).await?;
    s.flush().await?;
    let mut response = [0u8; RESPONSE_LEN];
    s.read_exact(&mut response).await?;
    let (reply, outcome) = hs.reply(key, &response);
    let sent = match s.write_all(&reply).await {
        Ok(()) => s.flush().await,
        Err(e) => Err(e),
    };
    outcome?;
    Ok(sent?)
}

/// The client side on a tokio stream: the same messages, lengths and
/// errors as [`client_blocking`]. It sets no timeout of its own: wrap it
/// in `tokio::time::timeout`.
#[cfg(feature = "tokio")]
pub async fn client_async<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
) -> Result<(), AuthError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).await.map_err(client_read_error)?;
    let (hs, response) = ClientHandshake::respond(key, &hello)?;
    s.write_all(&response).await?;
    s.flush().await?;
    let mut confirm = [0u8; CONFIRM_LEN];
    s.read_exact(&mut confirm)
        .await
        .map_err(client_read_error)?;
    hs.check_confirm(key, &confirm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn pair(
        server_key: ClusterKey,
        client_key: ClusterKey,
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            server_blocking(&mut s, &server_key)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let cr = client_blocking(&mut c, &client_key);
        (t.join().unwrap(), cr)
    }

    #[test]
    fn same_key_passes_both_ways() {
        let k = ClusterKey::generate();
        let (s, c) = pair(k.clone(), k);
        assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (s, c) = pair(ClusterKey::generate(), ClusterKey::generate());
        assert!(matches!(s, Err(AuthError::PeerFailed)), "{s:?}");
        assert!(matches!(c, Err(AuthError::Rejected)), "{c:?}");
    }

    #[test]
    fn sans_io_detects_a_server_without_the_key() {
        let k = ClusterKey::generate();
        let other = ClusterKey::generate();
        let (server, hello) = ServerHandshake::new();
        let (client, response) = ClientHandshake::respond(&k, &hello).unwrap();
        // A server that accepts anything but does not hold the key.
        let mut confirm = server.check(&k, &response).unwrap();
        client.check_confirm(&k, &confirm).unwrap();
        assert!(matches!(
            client.check_confirm(&other, &confirm),
            Err(AuthError::ServerNotProven)
        ));
        confirm[5] ^= 1;
        assert!(matches!(
            client.check_confirm(&k, &confirm),
            Err(AuthError::ServerNotProven)
        ));
        assert!(matches!(
            client.check_confirm(&k, &REJECT),
            Err(AuthError::Rejected)
        ));
        // The server's own proof reflected back is not a client proof.
        let mut reflected = [0u8; RESPONSE_LEN];
        reflected[..32].copy_from_slice(&response[..32]);
        reflected[32..].copy_from_slice(&confirm[1..]);
        assert!(server.check(&k, &reflected).is_err());
        // A replayed response does not pass a new challenge.
        let (server2, _) = ServerHandshake::new();
        assert!(matches!(
            server2.check(&k, &response),
            Err(AuthError::PeerFailed)
        ));
    }

    #[test]
    fn malformed_hello_is_rejected() {
        let k = ClusterKey::generate();
        let (_, mut hello) = ServerHandshake::new();
        hello[0] = b'X';
        assert!(matches!(
            ClientHandshake::respond(&k, &hello),
            Err(AuthError::Malformed)
        ));
        // A peer that speaks something else entirely.
        let mut junk =
            io::Cursor::new(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec());
        struct Rw<'a>(&'a mut io::Cursor<Vec<u8>>);
        impl Read for Rw<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.0.read(b)
            }
        }
        impl Write for Rw<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(matches!(
            client_blocking(&mut Rw(&mut junk), &k),
            Err(AuthError::Malformed)
        ));
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let k = ClusterKey::from_bytes(&[0xab; 20]).unwrap();
        let d = format!("{k:?}");
        assert!(!d.contains("ab") && !d.contains("171"), "{d}");
        assert_eq!(k.to_hex(), "ab".repeat(20));
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let k = ClusterKey::generate();
        let good = write("good", &format!("  {}\n", k.to_hex()), 0o600);
        assert_eq!(ClusterKey::load(&good).unwrap().to_hex(), k.to_hex());
        let upper = write("upper", &k.to_hex().to_uppercase(), 0o400);
        assert_eq!(ClusterKey::load(&upper).unwrap().to_hex(), k.to_hex());

        let open = write("open", &k.to_hex(), 0o644);
        let e = ClusterKey::load(&open).unwrap_err();
        assert!(
            matches!(e, AuthError::KeyFilePermissions { mode: 0o644, .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("chmod 600") && msg.contains(&open.display().to_string()),
            "{msg}"
        );
        let group = write("group", &k.to_hex(), 0o640);
        assert!(matches!(
            ClusterKey::load(&group),
            Err(AuthError::KeyFilePermissions { .. })
        ));

        let short = write("short", &"ab".repeat(15), 0o600);
        assert!(matches!(
            ClusterKey::load(&short),
            Err(AuthError::KeyTooShort { len: 15 })
        ));
        let nothex = write("nothex", &"zz".repeat(20), 0o600);
        assert!(matches!(
            ClusterKey::load(&nothex),
            Err(AuthError::KeyFileMalformed { .. })
        ));
        let odd = write("odd", &"a".repeat(41), 0o600);
        assert!(matches!(
            ClusterKey::load(&odd),
            Err(AuthError::KeyFileMalformed { .. })
        ));
        let missing = dir.path().join("missing");
        let e = ClusterKey::load(&missing).unwrap_err();
        assert!(
            matches!(e, AuthError::KeyFileRead { .. }) && e.to_string().contains("missing"),
            "{e}"
        );
        assert!(matches!(
            ClusterKey::from_bytes(&[1; 15]),
            Err(AuthError::KeyTooShort { len: 15 })
        ));
    }
}

/// Each async side against each blocking side, over real loopback TCP: the
/// blocking side runs on a thread, the async side on a tokio runtime.
#[cfg(all(test, feature = "tokio"))]
mod async_tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Duration = Duration::from_secs(5);

    /// A std listener whose one accepted connection `side` handles on a
    /// thread; returns its address and the thread.
    fn std_peer<R: Send + 'static>(
        side: impl FnOnce(std::net::TcpStream) -> R + Send + 'static,
    ) -> (std::net::SocketAddr, std::thread::JoinHandle<R>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.set_write_timeout(Some(T)).unwrap();
            side(s)
        });
        (addr, t)
    }

    /// Blocking server on a thread, [`client_async`] connecting to it.
    async fn async_client_vs_blocking_server(
        server_key: ClusterKey,
        client_key: ClusterKey,
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (addr, t) = std_peer(move |mut s| server_blocking(&mut s, &server_key));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let cr = tokio::time::timeout(T, client_async(&mut c, &client_key))
            .await
            .expect("client_async timed out");
        (t.join().unwrap(), cr)
    }

    /// [`server_async`] accepting a blocking client on a thread.
    async fn async_server_vs_blocking_client(
        server_key: ClusterKey,
        client_key: ClusterKey,
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(T)).unwrap();
            client_blocking(&mut c, &client_key)
        });
        let (mut s, _) = l.accept().await.unwrap();
        let sr = tokio::time::timeout(T, server_async(&mut s, &server_key))
            .await
            .expect("server_async timed out");
        drop(s);
        (sr, t.join().unwrap())
    }

    #[tokio::test]
    async fn async_client_with_blocking_server() {
        let k = ClusterKey::generate();
        let (s, c) = async_client_vs_blocking_server(k.clone(), k).await;
        assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
        let (s, c) =
            async_client_vs_blocking_server(ClusterKey::generate(), ClusterKey::generate()).await;
        assert!(matches!(s, Err(AuthError::PeerFailed)), "{s:?}");
        assert!(matches!(c, Err(AuthError::Rejected)), "{c:?}");
    }

    #[tokio::test]
    async fn async_server_with_blocking_client() {
        let k = ClusterKey::generate();
        let (s, c) = async_server_vs_blocking_client(k.clone(), k).await;
        assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
        let (s, c) =
            async_server_vs_blocking_client(ClusterKey::generate(), ClusterKey::generate()).await;
        assert!(matches!(s, Err(AuthError::PeerFailed)), "{s:?}");
        assert!(matches!(c, Err(AuthError::Rejected)), "{c:?}");
    }

    #[tokio::test]
    async fn async_sides_with_each_other_over_a_duplex() {
        let k = ClusterKey::generate();
        let (mut a, mut b) = tokio::io::duplex(64);
        let (s, c) = tokio::join!(server_async(&mut a, &k), client_async(&mut b, &k));
        assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
        let (mut a, mut b) = tokio::io::duplex(64);
        let other = ClusterKey::generate();
        let (s, c) = tokio::join!(server_async(&mut a, &k), client_async(&mut b, &other));
        assert!(matches!(s, Err(AuthError::PeerFailed)), "{s:?}");
        assert!(matches!(c, Err(AuthError::Rejected)), "{c:?}");
    }

    /// A server that sends part of a HELLO (or a whole HELLO, then reads the
    /// response and hangs up): both clients report `ClosedByServer`.
    #[tokio::test]
    async fn truncated_server_is_closed_by_server_for_both_clients() {
        let k = ClusterKey::generate();
        for cut in [0, 1, HELLO_LEN - 1] {
            let (addr, t) = std_peer(move |mut s| {
                let (_, hello) = ServerHandshake::new();
                s.write_all(&hello[..cut]).unwrap();
            });
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let r = client_async(&mut c, &k).await;
            assert!(matches!(r, Err(AuthError::ClosedByServer)), "{cut}: {r:?}");
            t.join().unwrap();

            let (addr, t) = std_peer(move |mut s| {
                let (_, hello) = ServerHandshake::new();
                s.write_all(&hello[..cut]).unwrap();
            });
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let r = client_blocking(&mut c, &k);
            assert!(matches!(r, Err(AuthError::ClosedByServer)), "{cut}: {r:?}");
            t.join().unwrap();
        }
        // Whole HELLO, then the server reads the RESPONSE and closes.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (_, hello) = ServerHandshake::new();
            s.write_all(&hello).await.unwrap();
            let mut resp = [0u8; RESPONSE_LEN];
            s.read_exact(&mut resp).await.unwrap();
        });
        let key = k.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(T)).unwrap();
            client_blocking(&mut c, &key)
        })
        .await
        .unwrap();
        assert!(matches!(r, Err(AuthError::ClosedByServer)), "{r:?}");
        server.await.unwrap();
    }

    /// A client that sends part of a RESPONSE and hangs up: both servers
    /// fail with an I/O error (unexpected end of stream).
    #[tokio::test]
    async fn truncated_client_is_an_io_error_for_both_servers() {
        let k = ClusterKey::generate();
        for cut in [0, 1, RESPONSE_LEN - 1] {
            let client = move |addr| {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                let mut hello = [0u8; HELLO_LEN];
                c.read_exact(&mut hello).unwrap();
                c.write_all(&[7u8; RESPONSE_LEN][..cut]).unwrap();
            };
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let t = std::thread::spawn(move || client(addr));
            let (mut s, _) = l.accept().await.unwrap();
            let r = server_async(&mut s, &k).await;
            assert!(
                matches!(&r, Err(AuthError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
                "{cut}: {r:?}"
            );
            t.join().unwrap();

            let key = k.clone();
            let (addr, t) = std_peer(move |mut s| server_blocking(&mut s, &key));
            tokio::task::spawn_blocking(move || client(addr))
                .await
                .unwrap();
            let r = t.join().unwrap();
            assert!(
                matches!(&r, Err(AuthError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
                "{cut}: {r:?}"
            );
        }
    }

    /// A peer that is not a snowflock server: both clients say `Malformed`.
    #[tokio::test]
    async fn foreign_server_is_malformed_for_both_clients() {
        let k = ClusterKey::generate();
        let junk = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n-----------".to_vec();
        assert!(junk.len() >= HELLO_LEN);
        let j = junk.clone();
        let (addr, t) = std_peer(move |mut s| s.write_all(&j).unwrap());
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = client_async(&mut c, &k).await;
        assert!(matches!(r, Err(AuthError::Malformed)), "{r:?}");
        t.join().unwrap();
        let (addr, t) = std_peer(move |mut s| s.write_all(&junk).unwrap());
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let r = client_blocking(&mut c, &k);
        assert!(matches!(r, Err(AuthError::Malformed)), "{r:?}");
        t.join().unwrap();
    }
}
