//! Deletions, as the watch streams report them. The controller puts no finalizer on its objects
//! (docs/adr/0002-no-finalizers.md), so that they can be deleted whether or not it runs; it
//! releases a deleted object's address (held back) when its watch says the object is gone.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::runtime::watcher::Event;
use mesh_core::Owner;

/// The owners whose objects a watch event says are gone:
/// - `Delete`: the deleted object's;
/// - `InitDone`, the end of a (re)list, after which the watch cache holds exactly the listed
///   objects (`live`): every owner in `tracked` (those the controller holds something for) that
///   is not among them, since a watch that lists again after an outage reports no `Delete` for
///   what went meanwhile;
/// - nothing for the other events.
pub fn gone<K>(
    event: &Event<K>,
    owner_of: impl Fn(&K) -> Owner,
    live: impl FnOnce() -> Vec<Arc<K>>,
    tracked: impl FnOnce() -> BTreeSet<Owner>,
) -> Vec<Owner> {
    match event {
        Event::Delete(obj) => vec![owner_of(obj)],
        Event::InitDone => {
            let live: BTreeSet<Owner> = live().iter().map(|obj| owner_of(obj)).collect();
            tracked().into_iter().filter(|owner| !live.contains(owner)).collect()
        }
        Event::Apply(_) | Event::Init | Event::InitApply(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object, by name; its owner is the MeshNode of that name.
    struct Obj(&'static str);

    fn owner_of(obj: &Obj) -> Owner {
        Owner::node(obj.0)
    }

    fn owners(names: &[&str]) -> BTreeSet<Owner> {
        names.iter().map(|n| Owner::node(*n)).collect()
    }

    fn live(names: &[&'static str]) -> impl FnOnce() -> Vec<Arc<Obj>> {
        let objs: Vec<Arc<Obj>> = names.iter().map(|n| Arc::new(Obj(n))).collect();
        move || objs
    }

    #[test]
    fn a_delete_names_its_object() {
        let event = Event::Delete(Obj("a"));
        assert_eq!(gone(&event, owner_of, live(&["b"]), || owners(&["a", "b"])), [Owner::node("a")]);
    }

    #[test]
    fn a_relist_names_what_the_controller_tracks_and_the_list_lacks() {
        let tracked = || owners(&["a", "b", "c"]);
        assert_eq!(gone(&Event::InitDone, owner_of, live(&["b", "d"]), tracked), [Owner::node("a"), Owner::node("c")]);
        assert!(gone(&Event::InitDone, owner_of, live(&["a", "b", "c"]), tracked).is_empty());
    }

    #[test]
    fn other_events_name_nothing() {
        let tracked = || owners(&["a"]);
        for event in [Event::Apply(Obj("a")), Event::Init, Event::InitApply(Obj("a"))] {
            assert!(gone(&event, owner_of, live(&[]), tracked).is_empty());
        }
    }
}
