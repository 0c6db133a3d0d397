//! Listeners a config moves: bound on the reload thread while the change is validated, so a bind
//! failure refuses the change whole, and handed to the server only when it commits.
//!
//! Owns: binding and the hand-over. Must not touch: the listeners in force (the server swaps
//! them when it takes the handed-over sockets).

use crate::state::Shared;

/// A listening socket as the server's own: address reuse on, so a port left in TIME_WAIT by a
/// listener moved away can be taken back; non-blocking, for the runtime.
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A UDP socket for QUIC, non-blocking for the runtime. No address reuse: two processes
/// sharing a UDP port would split its datagrams between them.
pub fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Sockets bound for a change under validation: dropped (closed) unless the change commits.
pub(super) type Bound = Vec<crate::state::Handoff>;

/// Binds the listen addresses `new` has and `old` had not. Err: an address that cannot be bound;
/// what was bound before it is closed, and the listeners in force stay.
pub(super) fn bind_moved(
    old: &crate::config::Listen,
    new: &crate::config::Listen,
    generation: u64,
) -> Result<Bound, String> {
    use crate::state::ListenerKind;
    let wanted = [
        (
            ListenerKind::Https,
            "https",
            Some(new.https),
            Some(old.https),
        ),
        (ListenerKind::Http, "http", new.http, old.http),
        (ListenerKind::Admin, "admin", new.admin, old.admin),
        (ListenerKind::Quic, "quic", new.quic, old.quic),
    ];
    let mut bound = Vec::new();
    for (kind, name, want, had) in wanted {
        let Some(addr) = want.filter(|_| want != had) else {
            continue;
        };
        let bound_socket = if kind == ListenerKind::Quic {
            bind_udp(addr).map(crate::state::BoundSocket::Udp)
        } else {
            bind_listener(addr).map(crate::state::BoundSocket::Tcp)
        };
        let socket = bound_socket.map_err(|e| {
            format!("cannot bind listen.{name} {addr}: {e}; the listeners in force stay, and so does the rest of the config until this is fixed")
        })?;
        bound.push((generation, kind, addr, socket));
    }
    Ok(bound)
}

/// The commit's part: the server takes these over once it sees the published generation.
pub(super) fn hand_over(bound: Bound, shared: &Shared) {
    if bound.is_empty() {
        return;
    }
    crate::state::lock(&shared.handoff).extend(bound);
}
