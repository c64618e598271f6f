"""Every invoice query, one module per concern.

- `sums`: the usage-sum toolkit, the ledger summed in SQL for any usage window;
- `rollup`: `usage_rollup`, kept by a background job and summed back;
- `cutoff`: the instant up to which every ledger row is committed;
- `tasks`: the quoted tasks an invoice bills, and their rows;
- `flagged`: the flagged usage it bills that no admin has reviewed;
- `invoices`: invoice rows, their lines and usage windows, numbers and account locks;
- `credit_notes`: credit notes issued against finalized invoices.
"""
