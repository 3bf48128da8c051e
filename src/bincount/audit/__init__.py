"""The inventory audit: count bins in the store with an exported model and rank them by how likely their expected
quantity is wrong. `plan` fixes the work list, `worker` audits shards of it (resumably, in parallel), `report`
merges the shards; `local` and `kubernetes` run the workers on each backend."""
