"""The load benchmark: workloads, closed and open loop runners, report, reconciliation and plots."""
