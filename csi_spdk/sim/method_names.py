"""Method names a real SPDK v25.09 spdk_tgt reports (modules: lvol, malloc, aio,
nvmf TCP, keyring_file), recorded in spdk-golden/01_basic.json.

Kept verbatim so ``rpc_get_methods`` answers exactly like the real target; the
simulator implements only a subset (see ``methods.py``), and an unimplemented
listed method answers like an unknown one would not: it returns -32601.
"""

from __future__ import annotations

ALL_METHODS: tuple[str, ...] = (
    "spdk_get_version", "rpc_get_methods", "keyring_get_keys", "trace_get_info",
    "trace_get_tpoint_group_mask", "trace_disable_tpoint_group", "trace_enable_tpoint_group",
    "trace_clear_tpoint_mask", "trace_set_tpoint_mask", "framework_get_pci_devices",
    "framework_get_config", "framework_get_subsystems", "iobuf_get_stats", "iobuf_set_options",
    "sock_get_default_impl", "sock_set_default_impl", "sock_impl_set_options",
    "sock_impl_get_options", "vmd_rescan", "vmd_remove_device", "vmd_enable", "accel_get_stats",
    "accel_set_options", "accel_set_driver", "accel_crypto_key_destroy", "accel_crypto_keys_get",
    "accel_crypto_key_create", "accel_assign_opc", "accel_get_module_info",
    "accel_get_opc_assignments", "notify_get_notifications", "notify_get_types",
    "bdev_get_histogram", "bdev_enable_histogram", "bdev_set_qos_limit",
    "bdev_set_qd_sampling_period", "bdev_get_bdevs", "bdev_reset_iostat", "bdev_get_iostat",
    "bdev_examine", "bdev_wait_for_examine", "bdev_set_options", "nbd_get_disks", "nbd_stop_disk",
    "nbd_start_disk", "env_dpdk_get_mem_stats", "thread_set_cpumask", "scheduler_set_options",
    "framework_get_governor", "framework_get_scheduler", "framework_set_scheduler",
    "framework_get_reactors", "thread_get_io_channels", "thread_get_pollers", "thread_get_stats",
    "framework_monitor_context_switch", "spdk_kill_instance", "log_enable_timestamps",
    "log_get_flags", "log_clear_flag", "log_set_flag", "log_get_level", "log_set_level",
    "log_get_print_level", "log_set_print_level", "framework_enable_cpumask_locks",
    "framework_disable_cpumask_locks", "framework_wait_init", "framework_start_init",
    "nvmf_stop_mdns_prr", "nvmf_publish_mdns_prr", "nvmf_subsystem_get_listeners",
    "nvmf_subsystem_get_qpairs", "nvmf_subsystem_get_controllers", "nvmf_get_stats",
    "nvmf_get_transports", "nvmf_create_transport", "nvmf_get_targets", "nvmf_delete_target",
    "nvmf_create_target", "nvmf_subsystem_allow_any_host", "nvmf_subsystem_set_keys",
    "nvmf_subsystem_remove_host", "nvmf_subsystem_add_host", "nvmf_ns_remove_host",
    "nvmf_ns_add_host", "nvmf_subsystem_remove_ns", "nvmf_subsystem_set_ns_ana_group",
    "nvmf_subsystem_add_ns", "nvmf_subsystem_listener_set_ana_state",
    "nvmf_discovery_get_referrals", "nvmf_discovery_remove_referral",
    "nvmf_discovery_add_referral", "nvmf_subsystem_remove_listener", "nvmf_subsystem_add_listener",
    "nvmf_delete_subsystem", "nvmf_create_subsystem", "nvmf_get_subsystems", "nvmf_set_crdt",
    "nvmf_set_config", "nvmf_set_max_subsystems", "scsi_get_devices", "iscsi_get_histogram",
    "iscsi_enable_histogram", "iscsi_set_options", "iscsi_get_auth_groups",
    "iscsi_auth_group_remove_secret", "iscsi_auth_group_add_secret", "iscsi_delete_auth_group",
    "iscsi_create_auth_group", "iscsi_set_discovery_auth", "iscsi_get_options",
    "iscsi_target_node_request_logout", "iscsi_target_node_set_redirect",
    "iscsi_target_node_set_auth", "iscsi_target_node_add_lun", "iscsi_get_stats",
    "iscsi_get_connections", "iscsi_portal_group_set_auth", "iscsi_start_portal_group",
    "iscsi_delete_portal_group", "iscsi_create_portal_group", "iscsi_get_portal_groups",
    "iscsi_delete_target_node", "iscsi_target_node_remove_pg_ig_maps",
    "iscsi_target_node_add_pg_ig_maps", "iscsi_create_target_node", "iscsi_get_target_nodes",
    "iscsi_delete_initiator_group", "iscsi_initiator_group_remove_initiators",
    "iscsi_initiator_group_add_initiators", "iscsi_create_initiator_group",
    "iscsi_get_initiator_groups", "keyring_linux_set_options", "keyring_file_remove_key",
    "keyring_file_add_key", "ioat_scan_accel_module", "accel_error_inject_error",
    "bdev_ftl_set_property", "bdev_ftl_get_properties", "bdev_ftl_get_stats", "bdev_ftl_unmap",
    "bdev_ftl_unload", "bdev_ftl_delete", "bdev_ftl_load", "bdev_ftl_create", "bdev_aio_delete",
    "bdev_aio_rescan", "bdev_aio_create", "bdev_zone_block_delete", "bdev_zone_block_create",
    "bdev_delay_delete", "bdev_delay_create", "bdev_delay_update_latency", "bdev_split_delete",
    "bdev_split_create", "bdev_error_inject_error", "bdev_error_delete", "bdev_error_create",
    "bdev_raid_set_options", "bdev_raid_remove_base_bdev", "bdev_raid_add_base_bdev",
    "bdev_raid_delete", "bdev_raid_create", "bdev_raid_get_bdevs", "bdev_lvol_set_parent_bdev",
    "bdev_lvol_set_parent", "bdev_lvol_check_shallow_copy", "bdev_lvol_start_shallow_copy",
    "bdev_lvol_grow_lvstore", "bdev_lvol_get_lvols", "bdev_lvol_get_lvstores", "bdev_lvol_delete",
    "bdev_lvol_set_read_only", "bdev_lvol_resize", "bdev_lvol_decouple_parent",
    "bdev_lvol_inflate", "bdev_lvol_rename", "bdev_lvol_clone_bdev", "bdev_lvol_clone",
    "bdev_lvol_snapshot", "bdev_lvol_create", "bdev_lvol_delete_lvstore",
    "bdev_lvol_rename_lvstore", "bdev_lvol_create_lvstore", "bdev_passthru_delete",
    "bdev_passthru_create", "bdev_opal_new_user", "bdev_opal_set_lock_state", "bdev_opal_delete",
    "bdev_opal_get_info", "bdev_opal_create", "bdev_nvme_opal_revert", "bdev_nvme_opal_init",
    "bdev_nvme_send_cmd", "bdev_nvme_set_keys", "bdev_nvme_get_path_iostat",
    "bdev_nvme_get_mdns_discovery_info", "bdev_nvme_stop_mdns_discovery",
    "bdev_nvme_start_mdns_discovery", "bdev_nvme_set_multipath_policy",
    "bdev_nvme_set_preferred_path", "bdev_nvme_get_io_paths", "bdev_nvme_remove_error_injection",
    "bdev_nvme_add_error_injection", "bdev_nvme_get_discovery_info", "bdev_nvme_stop_discovery",
    "bdev_nvme_start_discovery", "bdev_nvme_get_controller_health_info",
    "bdev_nvme_disable_controller", "bdev_nvme_enable_controller", "bdev_nvme_reset_controller",
    "bdev_nvme_get_transport_statistics", "bdev_nvme_apply_firmware",
    "bdev_nvme_detach_controller", "bdev_nvme_get_controllers", "bdev_nvme_attach_controller",
    "bdev_nvme_set_hotplug", "bdev_nvme_set_options", "bdev_null_resize", "bdev_null_delete",
    "bdev_null_create", "bdev_malloc_delete", "bdev_malloc_create",
)

# Methods only allowed before framework_start_init (absent from ``current``).
STARTUP_ONLY: tuple[str, ...] = (
    "iobuf_set_options", "sock_set_default_impl", "sock_impl_set_options", "vmd_enable",
    "accel_set_options", "accel_set_driver", "accel_assign_opc", "bdev_set_options",
    "scheduler_set_options", "framework_start_init", "nvmf_set_crdt", "nvmf_set_config",
    "nvmf_set_max_subsystems", "iscsi_set_options", "keyring_linux_set_options",
    "ioat_scan_accel_module",
)

# Deprecated aliases listed first by ``include_aliases``.
ALIASES: tuple[str, ...] = (
    "enable_vmd", "accel_get_engine_info", "ioat_scan_accel_engine", "get_lvol_stores",
)
