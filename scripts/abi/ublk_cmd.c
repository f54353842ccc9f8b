/* ffi/ublk_cmd.ts against linux/ublk_cmd.h (see abi.h). Names the header gained after the
 * installed version are reported as not in this header, keyed on the macro that came with them. */
#include <linux/errno.h>
#include <linux/ioctl.h> /* older ublk_cmd.h use _IOR/_IOWR without including it */
#include <linux/ublk_cmd.h>
#include "abi.h"


int main(void)
{
	abi_begin("ffi/ublk_cmd.ts", "linux/ublk_cmd.h");

	SIZE("CTRL_CMD_SIZE", struct ublksrv_ctrl_cmd);
	OFFSET("CTRL_CMD_DEV_ID", struct ublksrv_ctrl_cmd, dev_id);
	OFFSET("CTRL_CMD_QUEUE_ID", struct ublksrv_ctrl_cmd, queue_id);
	OFFSET("CTRL_CMD_LEN", struct ublksrv_ctrl_cmd, len);
	OFFSET("CTRL_CMD_ADDR", struct ublksrv_ctrl_cmd, addr);
	OFFSET("CTRL_CMD_DATA0", struct ublksrv_ctrl_cmd, data);
#ifdef UBLK_F_UNPRIVILEGED_DEV
	OFFSET("CTRL_CMD_DEV_PATH_LEN", struct ublksrv_ctrl_cmd, dev_path_len);
#else
	MISSING("CTRL_CMD_DEV_PATH_LEN");
#endif

	SIZE("IO_CMD_SIZE", struct ublksrv_io_cmd);
	OFFSET("IO_CMD_Q_ID", struct ublksrv_io_cmd, q_id);
	OFFSET("IO_CMD_TAG", struct ublksrv_io_cmd, tag);
	OFFSET("IO_CMD_RESULT", struct ublksrv_io_cmd, result);
	OFFSET("IO_CMD_ADDR", struct ublksrv_io_cmd, addr);

	CONST(UBLK_CMD_GET_QUEUE_AFFINITY);
	CONST(UBLK_CMD_GET_DEV_INFO);
	CONST(UBLK_CMD_ADD_DEV);
	CONST(UBLK_CMD_DEL_DEV);
	CONST(UBLK_CMD_START_DEV);
	CONST(UBLK_CMD_STOP_DEV);
	CONST(UBLK_CMD_SET_PARAMS);
	CONST(UBLK_CMD_GET_PARAMS);
	CONST(UBLK_CMD_START_USER_RECOVERY);
	CONST(UBLK_CMD_END_USER_RECOVERY);
#ifdef UBLK_CMD_GET_DEV_INFO2
	CONST(UBLK_CMD_GET_DEV_INFO2);
#else
	MISSING("UBLK_CMD_GET_DEV_INFO2");
#endif

	/* ioctl-encoded opcodes (Linux 6.3+ headers). */
#ifdef UBLK_U_CMD_ADD_DEV
	CONST(UBLK_U_CMD_GET_QUEUE_AFFINITY);
	CONST(UBLK_U_CMD_GET_DEV_INFO);
	CONST(UBLK_U_CMD_ADD_DEV);
	CONST(UBLK_U_CMD_DEL_DEV);
	CONST(UBLK_U_CMD_START_DEV);
	CONST(UBLK_U_CMD_STOP_DEV);
	CONST(UBLK_U_CMD_SET_PARAMS);
	CONST(UBLK_U_CMD_GET_PARAMS);
	CONST(UBLK_U_CMD_START_USER_RECOVERY);
	CONST(UBLK_U_CMD_END_USER_RECOVERY);
	CONST(UBLK_U_CMD_GET_DEV_INFO2);
	CONST(UBLK_U_IO_FETCH_REQ);
	CONST(UBLK_U_IO_COMMIT_AND_FETCH_REQ);
	CONST(UBLK_U_IO_NEED_GET_DATA);
#else
	MISSING("UBLK_U_CMD_GET_QUEUE_AFFINITY");
	MISSING("UBLK_U_CMD_GET_DEV_INFO");
	MISSING("UBLK_U_CMD_ADD_DEV");
	MISSING("UBLK_U_CMD_DEL_DEV");
	MISSING("UBLK_U_CMD_START_DEV");
	MISSING("UBLK_U_CMD_STOP_DEV");
	MISSING("UBLK_U_CMD_SET_PARAMS");
	MISSING("UBLK_U_CMD_GET_PARAMS");
	MISSING("UBLK_U_CMD_START_USER_RECOVERY");
	MISSING("UBLK_U_CMD_END_USER_RECOVERY");
	MISSING("UBLK_U_CMD_GET_DEV_INFO2");
	MISSING("UBLK_U_IO_FETCH_REQ");
	MISSING("UBLK_U_IO_COMMIT_AND_FETCH_REQ");
	MISSING("UBLK_U_IO_NEED_GET_DATA");
#endif
#ifdef UBLK_U_CMD_GET_FEATURES
	CONST(UBLK_U_CMD_GET_FEATURES);
	CONST(UBLK_FEATURES_LEN);
#else
	MISSING("UBLK_U_CMD_GET_FEATURES");
	MISSING("UBLK_FEATURES_LEN");
#endif
#ifdef UBLK_U_CMD_DEL_DEV_ASYNC
	CONST(UBLK_U_CMD_DEL_DEV_ASYNC);
#else
	MISSING("UBLK_U_CMD_DEL_DEV_ASYNC");
#endif
#ifdef UBLK_U_CMD_UPDATE_SIZE
	CONST(UBLK_U_CMD_UPDATE_SIZE);
#else
	MISSING("UBLK_U_CMD_UPDATE_SIZE");
#endif
#ifdef UBLK_U_CMD_QUIESCE_DEV
	CONST(UBLK_U_CMD_QUIESCE_DEV);
#else
	MISSING("UBLK_U_CMD_QUIESCE_DEV");
#endif
#ifdef UBLK_U_CMD_TRY_STOP_DEV
	CONST(UBLK_U_CMD_TRY_STOP_DEV);
#else
	MISSING("UBLK_U_CMD_TRY_STOP_DEV");
#endif
#ifdef UBLK_U_IO_REGISTER_IO_BUF
	CONST(UBLK_U_IO_REGISTER_IO_BUF);
	CONST(UBLK_U_IO_UNREGISTER_IO_BUF);
#else
	MISSING("UBLK_U_IO_REGISTER_IO_BUF");
	MISSING("UBLK_U_IO_UNREGISTER_IO_BUF");
#endif

	CONST(UBLK_IO_FETCH_REQ);
	CONST(UBLK_IO_COMMIT_AND_FETCH_REQ);
	CONST(UBLK_IO_NEED_GET_DATA);
	SCONST(UBLK_IO_RES_OK);
	SCONST(UBLK_IO_RES_NEED_GET_DATA);
	SCONST(UBLK_IO_RES_ABORT);

	CONST(UBLKSRV_CMD_BUF_OFFSET);
	CONST(UBLKSRV_IO_BUF_OFFSET);
	CONST(UBLK_MAX_QUEUE_DEPTH);
#ifdef UBLK_MAX_NR_QUEUES
	CONST(UBLK_MAX_NR_QUEUES);
#else
	MISSING("UBLK_MAX_NR_QUEUES");
#endif
#ifdef UBLK_IO_BUF_BITS
	VALUE("UBLK_IO_BUF_MAX_BYTES", 1ULL << UBLK_IO_BUF_BITS);
#else
	MISSING("UBLK_IO_BUF_MAX_BYTES");
#endif

	CONST(UBLK_F_SUPPORT_ZERO_COPY);
	CONST(UBLK_F_URING_CMD_COMP_IN_TASK);
	CONST(UBLK_F_NEED_GET_DATA);
	CONST(UBLK_F_USER_RECOVERY);
	CONST(UBLK_F_USER_RECOVERY_REISSUE);
#ifdef UBLK_F_UNPRIVILEGED_DEV
	CONST(UBLK_F_UNPRIVILEGED_DEV);
#else
	MISSING("UBLK_F_UNPRIVILEGED_DEV");
#endif
#ifdef UBLK_F_CMD_IOCTL_ENCODE
	CONST(UBLK_F_CMD_IOCTL_ENCODE);
#else
	MISSING("UBLK_F_CMD_IOCTL_ENCODE");
#endif
#ifdef UBLK_F_USER_COPY
	CONST(UBLK_F_USER_COPY);
#else
	MISSING("UBLK_F_USER_COPY");
#endif
#ifdef UBLK_F_ZONED
	CONST(UBLK_F_ZONED);
#else
	MISSING("UBLK_F_ZONED");
#endif
#ifdef UBLK_F_USER_RECOVERY_FAIL_IO
	CONST(UBLK_F_USER_RECOVERY_FAIL_IO);
#else
	MISSING("UBLK_F_USER_RECOVERY_FAIL_IO");
#endif
#ifdef UBLK_F_UPDATE_SIZE
	CONST(UBLK_F_UPDATE_SIZE);
#else
	MISSING("UBLK_F_UPDATE_SIZE");
#endif
#ifdef UBLK_F_AUTO_BUF_REG
	CONST(UBLK_F_AUTO_BUF_REG);
#else
	MISSING("UBLK_F_AUTO_BUF_REG");
#endif
#ifdef UBLK_F_QUIESCE
	CONST(UBLK_F_QUIESCE);
#else
	MISSING("UBLK_F_QUIESCE");
#endif
#ifdef UBLK_F_PER_IO_DAEMON
	CONST(UBLK_F_PER_IO_DAEMON);
#else
	MISSING("UBLK_F_PER_IO_DAEMON");
#endif
#ifdef UBLK_F_BUF_REG_OFF_DAEMON
	CONST(UBLK_F_BUF_REG_OFF_DAEMON);
#else
	MISSING("UBLK_F_BUF_REG_OFF_DAEMON");
#endif
#ifdef UBLK_F_BATCH_IO
	CONST(UBLK_F_BATCH_IO);
#else
	MISSING("UBLK_F_BATCH_IO");
#endif
#ifdef UBLK_F_INTEGRITY
	CONST(UBLK_F_INTEGRITY);
#else
	MISSING("UBLK_F_INTEGRITY");
#endif
#ifdef UBLK_F_SAFE_STOP_DEV
	CONST(UBLK_F_SAFE_STOP_DEV);
#else
	MISSING("UBLK_F_SAFE_STOP_DEV");
#endif
#ifdef UBLK_F_NO_AUTO_PART_SCAN
	CONST(UBLK_F_NO_AUTO_PART_SCAN);
#else
	MISSING("UBLK_F_NO_AUTO_PART_SCAN");
#endif
#ifdef UBLK_F_SHMEM_ZC
	CONST(UBLK_F_SHMEM_ZC);
#else
	MISSING("UBLK_F_SHMEM_ZC");
#endif

	CONST(UBLK_S_DEV_DEAD);
	CONST(UBLK_S_DEV_LIVE);
	CONST(UBLK_S_DEV_QUIESCED);
#ifdef UBLK_S_DEV_FAIL_IO
	CONST(UBLK_S_DEV_FAIL_IO);
#else
	MISSING("UBLK_S_DEV_FAIL_IO");
#endif

	SIZE("DEV_INFO_SIZE", struct ublksrv_ctrl_dev_info);
	OFFSET("DEV_INFO_NR_HW_QUEUES", struct ublksrv_ctrl_dev_info, nr_hw_queues);
	OFFSET("DEV_INFO_QUEUE_DEPTH", struct ublksrv_ctrl_dev_info, queue_depth);
	OFFSET("DEV_INFO_STATE", struct ublksrv_ctrl_dev_info, state);
	OFFSET("DEV_INFO_MAX_IO_BUF_BYTES", struct ublksrv_ctrl_dev_info, max_io_buf_bytes);
	OFFSET("DEV_INFO_DEV_ID", struct ublksrv_ctrl_dev_info, dev_id);
	OFFSET("DEV_INFO_UBLKSRV_PID", struct ublksrv_ctrl_dev_info, ublksrv_pid);
	OFFSET("DEV_INFO_FLAGS", struct ublksrv_ctrl_dev_info, flags);
	OFFSET("DEV_INFO_UBLKSRV_FLAGS", struct ublksrv_ctrl_dev_info, ublksrv_flags);
#ifdef UBLK_F_UNPRIVILEGED_DEV
	OFFSET("DEV_INFO_OWNER_UID", struct ublksrv_ctrl_dev_info, owner_uid);
	OFFSET("DEV_INFO_OWNER_GID", struct ublksrv_ctrl_dev_info, owner_gid);
#else
	MISSING("DEV_INFO_OWNER_UID");
	MISSING("DEV_INFO_OWNER_GID");
#endif

	CONST(UBLK_PARAM_TYPE_BASIC);
	CONST(UBLK_PARAM_TYPE_DISCARD);
#ifdef UBLK_PARAM_TYPE_DEVT
	CONST(UBLK_PARAM_TYPE_DEVT);
#else
	MISSING("UBLK_PARAM_TYPE_DEVT");
#endif
#ifdef UBLK_PARAM_TYPE_ZONED
	CONST(UBLK_PARAM_TYPE_ZONED);
#else
	MISSING("UBLK_PARAM_TYPE_ZONED");
#endif
#ifdef UBLK_PARAM_TYPE_DMA_ALIGN
	CONST(UBLK_PARAM_TYPE_DMA_ALIGN);
#else
	MISSING("UBLK_PARAM_TYPE_DMA_ALIGN");
#endif
#ifdef UBLK_PARAM_TYPE_SEGMENT
	CONST(UBLK_PARAM_TYPE_SEGMENT);
#else
	MISSING("UBLK_PARAM_TYPE_SEGMENT");
#endif
	CONST(UBLK_ATTR_READ_ONLY);
	CONST(UBLK_ATTR_ROTATIONAL);
	CONST(UBLK_ATTR_VOLATILE_CACHE);
	CONST(UBLK_ATTR_FUA);

	OFFSET("PARAMS_LEN", struct ublk_params, len);
	OFFSET("PARAMS_TYPES", struct ublk_params, types);
	OFFSET("PARAMS_BASIC_ATTRS", struct ublk_params, basic.attrs);
	OFFSET("PARAMS_BASIC_LOGICAL_BS_SHIFT", struct ublk_params, basic.logical_bs_shift);
	OFFSET("PARAMS_BASIC_PHYSICAL_BS_SHIFT", struct ublk_params, basic.physical_bs_shift);
	OFFSET("PARAMS_BASIC_IO_OPT_SHIFT", struct ublk_params, basic.io_opt_shift);
	OFFSET("PARAMS_BASIC_IO_MIN_SHIFT", struct ublk_params, basic.io_min_shift);
	OFFSET("PARAMS_BASIC_MAX_SECTORS", struct ublk_params, basic.max_sectors);
	OFFSET("PARAMS_BASIC_CHUNK_SECTORS", struct ublk_params, basic.chunk_sectors);
	OFFSET("PARAMS_BASIC_DEV_SECTORS", struct ublk_params, basic.dev_sectors);
	OFFSET("PARAMS_BASIC_VIRT_BOUNDARY_MASK", struct ublk_params, basic.virt_boundary_mask);
	OFFSET("PARAMS_DISCARD_ALIGNMENT", struct ublk_params, discard.discard_alignment);
	OFFSET("PARAMS_DISCARD_GRANULARITY", struct ublk_params, discard.discard_granularity);
	OFFSET("PARAMS_DISCARD_MAX_SECTORS", struct ublk_params, discard.max_discard_sectors);
	OFFSET("PARAMS_DISCARD_MAX_WRITE_ZEROES_SECTORS", struct ublk_params,
	       discard.max_write_zeroes_sectors);
	OFFSET("PARAMS_DISCARD_MAX_SEGMENTS", struct ublk_params, discard.max_discard_segments);
	VALUE("PARAMS_SIZE_THROUGH_DISCARD",
	      offsetof(struct ublk_params, discard) + sizeof(struct ublk_param_discard));
#ifdef UBLK_PARAM_TYPE_DEVT
	OFFSET("PARAMS_DEVT_CHAR_MAJOR", struct ublk_params, devt.char_major);
	OFFSET("PARAMS_DEVT_CHAR_MINOR", struct ublk_params, devt.char_minor);
	OFFSET("PARAMS_DEVT_DISK_MAJOR", struct ublk_params, devt.disk_major);
	OFFSET("PARAMS_DEVT_DISK_MINOR", struct ublk_params, devt.disk_minor);
	VALUE("PARAMS_SIZE_THROUGH_DEVT",
	      offsetof(struct ublk_params, devt) + sizeof(struct ublk_param_devt));
#else
	MISSING("PARAMS_DEVT_CHAR_MAJOR");
	MISSING("PARAMS_DEVT_CHAR_MINOR");
	MISSING("PARAMS_DEVT_DISK_MAJOR");
	MISSING("PARAMS_DEVT_DISK_MINOR");
	MISSING("PARAMS_SIZE_THROUGH_DEVT");
#endif

	SIZE("IO_DESC_SIZE", struct ublksrv_io_desc);
	OFFSET("IO_DESC_OP_FLAGS", struct ublksrv_io_desc, op_flags);
	OFFSET("IO_DESC_NR_SECTORS", struct ublksrv_io_desc, nr_sectors);
	OFFSET("IO_DESC_START_SECTOR", struct ublksrv_io_desc, start_sector);
	OFFSET("IO_DESC_ADDR", struct ublksrv_io_desc, addr);
	CONST(UBLK_IO_OP_READ);
	CONST(UBLK_IO_OP_WRITE);
	CONST(UBLK_IO_OP_FLUSH);
	CONST(UBLK_IO_OP_DISCARD);
	CONST(UBLK_IO_OP_WRITE_SAME);
	CONST(UBLK_IO_OP_WRITE_ZEROES);
	CONST(UBLK_IO_F_FAILFAST_DEV);
	CONST(UBLK_IO_F_FAILFAST_TRANSPORT);
	CONST(UBLK_IO_F_FAILFAST_DRIVER);
	CONST(UBLK_IO_F_META);
	CONST(UBLK_IO_F_FUA);
	CONST(UBLK_IO_F_NOUNMAP);
	CONST(UBLK_IO_F_SWAP);
#ifdef UBLK_U_IO_PREP_IO_CMDS
	SIZE("BATCH_IO_SIZE", struct ublk_batch_io);
	OFFSET("BATCH_IO_Q_ID", struct ublk_batch_io, q_id);
	OFFSET("BATCH_IO_FLAGS", struct ublk_batch_io, flags);
	OFFSET("BATCH_IO_NR_ELEM", struct ublk_batch_io, nr_elem);
	OFFSET("BATCH_IO_ELEM_BYTES", struct ublk_batch_io, elem_bytes);
	CONST(UBLK_BATCH_F_HAS_BUF_ADDR);
	SIZE("ELEM_HEADER_SIZE", struct ublk_elem_header);
	OFFSET("ELEM_TAG", struct ublk_elem_header, tag);
	OFFSET("ELEM_BUF_INDEX", struct ublk_elem_header, buf_index);
	OFFSET("ELEM_RESULT", struct ublk_elem_header, result);
	/* buf_addr follows the header (the element layout in the comment above struct ublk_batch_io). */
	VALUE("ELEM_BUF_ADDR", sizeof(struct ublk_elem_header));
	VALUE("FETCH_ELEM_BYTES", sizeof(__u16));
	CONST(UBLK_U_IO_PREP_IO_CMDS);
	CONST(UBLK_U_IO_COMMIT_IO_CMDS);
	CONST(UBLK_U_IO_FETCH_IO_CMDS);
#else
	MISSING("BATCH_IO_SIZE");
	MISSING("BATCH_IO_Q_ID");
	MISSING("BATCH_IO_FLAGS");
	MISSING("BATCH_IO_NR_ELEM");
	MISSING("BATCH_IO_ELEM_BYTES");
	MISSING("UBLK_BATCH_F_HAS_BUF_ADDR");
	MISSING("ELEM_HEADER_SIZE");
	MISSING("ELEM_TAG");
	MISSING("ELEM_BUF_INDEX");
	MISSING("ELEM_RESULT");
	MISSING("ELEM_BUF_ADDR");
	MISSING("FETCH_ELEM_BYTES");
	MISSING("UBLK_U_IO_PREP_IO_CMDS");
	MISSING("UBLK_U_IO_COMMIT_IO_CMDS");
	MISSING("UBLK_U_IO_FETCH_IO_CMDS");
#endif
#ifdef UBLK_AUTO_BUF_REG_FALLBACK
	CONST(UBLK_AUTO_BUF_REG_FALLBACK);
	CONST(UBLK_IO_F_NEED_REG_BUF);
	{
		/* The sqe->addr encoding: index in bits 0-15, flags in 16-23. */
		struct ublk_auto_buf_reg reg = { .index = 1, .flags = 1 };
		__u64 addr = ublk_auto_buf_reg_to_sqe_addr(&reg);
		VALUE("AUTO_BUF_REG_INDEX_SHIFT", __builtin_ctzll(addr & 0xffff));
		VALUE("AUTO_BUF_REG_FLAGS_SHIFT", __builtin_ctzll(addr & ~0xffffULL));
	}
#else
	MISSING("UBLK_AUTO_BUF_REG_FALLBACK");
	MISSING("UBLK_IO_F_NEED_REG_BUF");
	MISSING("AUTO_BUF_REG_INDEX_SHIFT");
	MISSING("AUTO_BUF_REG_FLAGS_SHIFT");
#endif

	return abi_end();
}
