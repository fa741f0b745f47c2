//! Kata's tcfilter model: every frame arriving on the veth is redirected to
//! the tap's egress (to the guest), and every frame arriving on the tap
//! (from the guest) to the veth's egress. Two ingress qdiscs, two u32
//! match-all filters with a mirred egress-redirect action; nothing is moved
//! or re-addressed.

use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};

use super::netns::Ns;
use super::NetworkError;

/// `ETH_P_ALL` as the kernel compares a filter's protocol: big endian (the
/// crate stores the value raw in `tcm_info`).
pub const PROTOCOL_ALL: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle, `ffff:`.
pub const INGRESS_HANDLE: u32 = 0xffff_0000;
/// How often adding a qdisc is tried while the kernel answers EBUSY.
const EBUSY_TRIES: u32 = 5;

/// The positive errno of a netlink error, if it is one.
pub fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(-message.raw_code()),
        _ => None,
    }
}

/// `tc qdisc add dev LINK ingress`, retrying EBUSY (10 ms × try), and
/// replacing an ingress qdisc already there (a crashed runtime's, whose
/// filters point at a tap that no longer exists).
pub async fn add_ingress_qdisc(ns: &Ns, index: u32, link: &str) -> Result<(), NetworkError> {
    let mut replaced = false;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = ns
            .handle
            .qdisc()
            .add(index as i32)
            .ingress()
            .execute()
            .await;
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        match errno(&error) {
            Some(libc::EBUSY) if attempt < EBUSY_TRIES => {
                tracing::debug!("{}: {link}: ingress qdisc busy, retrying", ns.label);
                pause(Duration::from_millis(10 * u64::from(attempt))).await;
            }
            Some(libc::EEXIST) if !replaced => {
                tracing::warn!(
                    "{}: {link} has an ingress qdisc already; replacing it",
                    ns.label
                );
                del_ingress_qdisc(ns, index, link).await?;
                replaced = true;
            }
            _ => return Err(ns.fail(link, "adding the ingress qdisc")(error)),
        }
    }
}

/// A short pause without a timer driver (the netns runtime has only I/O):
/// the thread is ours alone, so blocking it is harmless.
async fn pause(duration: Duration) {
    std::thread::sleep(duration);
}

/// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0
/// action mirred egress redirect dev TO`.
pub async fn add_redirect(
    ns: &Ns,
    from: u32,
    from_name: &str,
    to: u32,
) -> Result<(), NetworkError> {
    // Never `.priority()` after `.protocol()`: it overwrites the protocol.
    ns.handle
        .traffic_filter(from as i32)
        .add()
        .parent(INGRESS_HANDLE)
        .protocol(PROTOCOL_ALL)
        .redirect(to)
        .map_err(ns.fail(from_name, "building the redirect filter"))?
        .execute()
        .await
        .map_err(ns.fail(from_name, "adding the redirect filter"))
}

/// The qdiscs of link `index`.
pub async fn qdiscs(ns: &Ns, index: u32, link: &str) -> Result<Vec<TcMessage>, NetworkError> {
    let all: Vec<TcMessage> = ns
        .handle
        .qdisc()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail(link, "listing qdiscs"))?;
    Ok(all
        .into_iter()
        .filter(|q| q.header.index == index as i32)
        .collect())
}

/// Whether `qdisc` is an ingress qdisc.
pub fn is_ingress(qdisc: &TcMessage) -> bool {
    qdisc.header.parent == TcHandle::INGRESS
        && qdisc
            .attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == "ingress"))
}

/// The filters attached to the ingress qdisc of link `index`.
pub async fn ingress_filters(
    ns: &Ns,
    index: u32,
    link: &str,
) -> Result<Vec<TcMessage>, NetworkError> {
    let filters: Vec<TcMessage> = ns
        .handle
        .traffic_filter(index as i32)
        .get()
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(ns.fail(link, "listing ingress filters"))?;
    Ok(filters)
}

/// `tc qdisc del dev LINK ingress` (which takes its filters along), if the
/// link has one. A link or qdisc already gone is no error.
pub async fn del_ingress_qdisc(ns: &Ns, index: u32, link: &str) -> Result<(), NetworkError> {
    let present = match qdiscs(ns, index, link).await {
        Ok(qdiscs) => qdiscs.iter().any(is_ingress),
        Err(NetworkError::Netlink { error, .. }) if matches!(errno(&error), Some(libc::ENODEV)) => {
            false
        }
        Err(e) => return Err(e),
    };
    if !present {
        tracing::debug!("{}: {link} has no ingress qdisc", ns.label);
        return Ok(());
    }
    let mut request = ns.handle.qdisc().del(index as i32);
    // Parent and handle must be set: with parent 0 the kernel refuses
    // RTM_DELQDISC with EINVAL.
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    match request.execute().await {
        Ok(()) => Ok(()),
        Err(error) if matches!(errno(&error), Some(libc::ENODEV | libc::ENOENT)) => Ok(()),
        Err(error) => Err(ns.fail(link, "deleting the ingress qdisc")(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_all_is_big_endian() {
        assert_eq!(PROTOCOL_ALL.to_ne_bytes(), [0x00, 0x03]);
    }
}
