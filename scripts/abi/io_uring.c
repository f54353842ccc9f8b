/* ffi/io_uring.ts against linux/io_uring.h (see abi.h). */
#include <linux/io_uring.h>
#include <linux/fs.h>
#include <poll.h>
#include <sys/syscall.h>
#include "abi.h"

int main(void)
{
	abi_begin("ffi/io_uring.ts", "linux/io_uring.h");

	VALUE("SYS_io_uring_setup", __NR_io_uring_setup);
	VALUE("SYS_io_uring_enter", __NR_io_uring_enter);
	VALUE("SYS_io_uring_register", __NR_io_uring_register);

	CONST(IORING_SETUP_IOPOLL);
	CONST(IORING_SETUP_SQPOLL);
	CONST(IORING_SETUP_SQ_AFF);
	CONST(IORING_SETUP_CQSIZE);
	CONST(IORING_SETUP_CLAMP);
	CONST(IORING_SETUP_ATTACH_WQ);
	CONST(IORING_SETUP_R_DISABLED);
	CONST(IORING_SETUP_SUBMIT_ALL);
	CONST(IORING_SETUP_COOP_TASKRUN);
	CONST(IORING_SETUP_TASKRUN_FLAG);
	CONST(IORING_SETUP_SQE128);
	CONST(IORING_SETUP_CQE32);
	CONST(IORING_SETUP_SINGLE_ISSUER);
	CONST(IORING_SETUP_DEFER_TASKRUN);

	CONST(IORING_OP_NOP);
	CONST(IORING_OP_READV);
	CONST(IORING_OP_WRITEV);
	CONST(IORING_OP_FSYNC);
	CONST(IORING_OP_READ_FIXED);
	CONST(IORING_OP_WRITE_FIXED);
	CONST(IORING_OP_POLL_ADD);
	CONST(IORING_OP_POLL_REMOVE);
	CONST(IORING_OP_SYNC_FILE_RANGE);
	CONST(IORING_OP_TIMEOUT);
	CONST(IORING_OP_ASYNC_CANCEL);
	CONST(IORING_OP_LINK_TIMEOUT);
	CONST(IORING_OP_FALLOCATE);
	CONST(IORING_OP_CLOSE);
	CONST(IORING_OP_READ);
	CONST(IORING_OP_WRITE);
	CONST(IORING_OP_URING_CMD);

	CONST(IOSQE_FIXED_FILE);
	CONST(IOSQE_IO_DRAIN);
	CONST(IOSQE_IO_LINK);
	CONST(IOSQE_IO_HARDLINK);
	CONST(IOSQE_ASYNC);
	CONST(IOSQE_BUFFER_SELECT);
	CONST(IOSQE_CQE_SKIP_SUCCESS);

	CONST(IORING_FSYNC_DATASYNC);
	CONST(IORING_URING_CMD_FIXED);
	CONST(IORING_POLL_ADD_MULTI);
	CONST(IORING_ASYNC_CANCEL_ALL);
	CONST(IORING_ASYNC_CANCEL_FD);
	CONST(IORING_ASYNC_CANCEL_ANY);
	CONST(RWF_HIPRI);
	CONST(RWF_DSYNC);
	CONST(RWF_SYNC);
	CONST(RWF_NOWAIT);
	CONST(POLLIN);
	CONST(POLLOUT);
	CONST(POLLERR);
	CONST(POLLHUP);

	CONST(IORING_CQE_F_BUFFER);
	CONST(IORING_CQE_F_MORE);
	CONST(IORING_CQE_F_SOCK_NONEMPTY);
	CONST(IORING_CQE_F_NOTIF);
	CONST(IORING_CQE_BUFFER_SHIFT);
#ifdef IORING_CQE_F_BUF_MORE /* IOU_PBUF_RING_INC is an enum: guard on its twin */
	CONST(IORING_CQE_F_BUF_MORE);
	CONST(IOU_PBUF_RING_INC);
	OFFSET("BUF_REG_FLAGS", struct io_uring_buf_reg, flags); /* "pad" in older headers */
#else
	MISSING("IORING_CQE_F_BUF_MORE");
	MISSING("IOU_PBUF_RING_INC");
	MISSING("BUF_REG_FLAGS");
#endif
#ifdef IORING_URING_CMD_MULTISHOT
	CONST(IORING_URING_CMD_MULTISHOT);
#else
	MISSING("IORING_URING_CMD_MULTISHOT");
#endif
	CONST(IORING_REGISTER_PBUF_RING);
	CONST(IORING_UNREGISTER_PBUF_RING);
	OFFSET("BUF_REG_RING_ADDR", struct io_uring_buf_reg, ring_addr);
	OFFSET("BUF_REG_RING_ENTRIES", struct io_uring_buf_reg, ring_entries);
	OFFSET("BUF_REG_BGID", struct io_uring_buf_reg, bgid);
	SIZE("BUF_REG_SIZE", struct io_uring_buf_reg);
	OFFSET("BUF_ADDR", struct io_uring_buf, addr);
	OFFSET("BUF_LEN", struct io_uring_buf, len);
	OFFSET("BUF_BID", struct io_uring_buf, bid);
	SIZE("BUF_SIZE", struct io_uring_buf);
	OFFSET("BUF_RING_TAIL", struct io_uring_buf_ring, tail);

	CONST(IORING_OFF_SQ_RING);
	CONST(IORING_OFF_CQ_RING);
	CONST(IORING_OFF_SQES);

	CONST(IORING_SQ_NEED_WAKEUP);
	CONST(IORING_SQ_CQ_OVERFLOW);
	CONST(IORING_SQ_TASKRUN);

	CONST(IORING_ENTER_GETEVENTS);
	CONST(IORING_ENTER_SQ_WAKEUP);
	CONST(IORING_ENTER_SQ_WAIT);
	CONST(IORING_ENTER_EXT_ARG);
	CONST(IORING_ENTER_REGISTERED_RING);

	CONST(IORING_FEAT_SINGLE_MMAP);
	CONST(IORING_FEAT_NODROP);
	CONST(IORING_FEAT_SUBMIT_STABLE);
	CONST(IORING_FEAT_RW_CUR_POS);
	CONST(IORING_FEAT_CUR_PERSONALITY);
	CONST(IORING_FEAT_FAST_POLL);
	CONST(IORING_FEAT_POLL_32BITS);
	CONST(IORING_FEAT_SQPOLL_NONFIXED);
	CONST(IORING_FEAT_EXT_ARG);
	CONST(IORING_FEAT_NATIVE_WORKERS);
	CONST(IORING_FEAT_RSRC_TAGS);
	CONST(IORING_FEAT_CQE_SKIP);
	CONST(IORING_FEAT_LINKED_FILE);

	CONST(IORING_REGISTER_BUFFERS);
	CONST(IORING_UNREGISTER_BUFFERS);
	CONST(IORING_REGISTER_FILES);
	CONST(IORING_UNREGISTER_FILES);
	CONST(IORING_REGISTER_EVENTFD);
	CONST(IORING_UNREGISTER_EVENTFD);
	CONST(IORING_REGISTER_FILES_UPDATE);
	CONST(IORING_REGISTER_EVENTFD_ASYNC);
	CONST(IORING_REGISTER_PROBE);
	CONST(IORING_REGISTER_BUFFERS2);
	CONST(IORING_RSRC_REGISTER_SPARSE);

	OFFSET("RSRC_REGISTER_NR", struct io_uring_rsrc_register, nr);
	OFFSET("RSRC_REGISTER_FLAGS", struct io_uring_rsrc_register, flags);
	OFFSET("RSRC_REGISTER_DATA", struct io_uring_rsrc_register, data);
	OFFSET("RSRC_REGISTER_TAGS", struct io_uring_rsrc_register, tags);
	SIZE("RSRC_REGISTER_SIZE", struct io_uring_rsrc_register);
	CONST(IO_URING_OP_SUPPORTED);

	OFFSET("SQOFF_HEAD", struct io_sqring_offsets, head);
	OFFSET("SQOFF_TAIL", struct io_sqring_offsets, tail);
	OFFSET("SQOFF_RING_MASK", struct io_sqring_offsets, ring_mask);
	OFFSET("SQOFF_RING_ENTRIES", struct io_sqring_offsets, ring_entries);
	OFFSET("SQOFF_FLAGS", struct io_sqring_offsets, flags);
	OFFSET("SQOFF_DROPPED", struct io_sqring_offsets, dropped);
	OFFSET("SQOFF_ARRAY", struct io_sqring_offsets, array);
	SIZE("SQRING_OFFSETS_SIZE", struct io_sqring_offsets);

	OFFSET("CQOFF_HEAD", struct io_cqring_offsets, head);
	OFFSET("CQOFF_TAIL", struct io_cqring_offsets, tail);
	OFFSET("CQOFF_RING_MASK", struct io_cqring_offsets, ring_mask);
	OFFSET("CQOFF_RING_ENTRIES", struct io_cqring_offsets, ring_entries);
	OFFSET("CQOFF_OVERFLOW", struct io_cqring_offsets, overflow);
	OFFSET("CQOFF_CQES", struct io_cqring_offsets, cqes);
	OFFSET("CQOFF_FLAGS", struct io_cqring_offsets, flags);
	SIZE("CQRING_OFFSETS_SIZE", struct io_cqring_offsets);

	OFFSET("PARAMS_SQ_ENTRIES", struct io_uring_params, sq_entries);
	OFFSET("PARAMS_CQ_ENTRIES", struct io_uring_params, cq_entries);
	OFFSET("PARAMS_FLAGS", struct io_uring_params, flags);
	OFFSET("PARAMS_SQ_THREAD_CPU", struct io_uring_params, sq_thread_cpu);
	OFFSET("PARAMS_SQ_THREAD_IDLE", struct io_uring_params, sq_thread_idle);
	OFFSET("PARAMS_FEATURES", struct io_uring_params, features);
	OFFSET("PARAMS_WQ_FD", struct io_uring_params, wq_fd);
	OFFSET("PARAMS_SQ_OFF", struct io_uring_params, sq_off);
	OFFSET("PARAMS_CQ_OFF", struct io_uring_params, cq_off);
	SIZE("PARAMS_SIZE", struct io_uring_params);

	OFFSET("SQE_OPCODE", struct io_uring_sqe, opcode);
	OFFSET("SQE_FLAGS", struct io_uring_sqe, flags);
	OFFSET("SQE_IOPRIO", struct io_uring_sqe, ioprio);
	OFFSET("SQE_FD", struct io_uring_sqe, fd);
	OFFSET("SQE_OFF", struct io_uring_sqe, off);
	OFFSET("SQE_CMD_OP", struct io_uring_sqe, cmd_op);
	OFFSET("SQE_ADDR", struct io_uring_sqe, addr);
	OFFSET("SQE_LEN", struct io_uring_sqe, len);
	OFFSET("SQE_OP_FLAGS", struct io_uring_sqe, rw_flags);
	OFFSET("SQE_USER_DATA", struct io_uring_sqe, user_data);
	OFFSET("SQE_BUF_INDEX", struct io_uring_sqe, buf_index);
	OFFSET("SQE_PERSONALITY", struct io_uring_sqe, personality);
	OFFSET("SQE_FILE_INDEX", struct io_uring_sqe, file_index);
	OFFSET("SQE_ADDR3", struct io_uring_sqe, addr3);
	OFFSET("SQE_CMD", struct io_uring_sqe, cmd);
	SIZE("SQE_SIZE", struct io_uring_sqe);
	VALUE("SQE128_SIZE", 2 * sizeof(struct io_uring_sqe));
	/* With SQE128 the command area runs from cmd to the end of the doubled SQE. */
	VALUE("SQE128_CMD_BYTES", 2 * sizeof(struct io_uring_sqe) - offsetof(struct io_uring_sqe, cmd));

	OFFSET("CQE_USER_DATA", struct io_uring_cqe, user_data);
	OFFSET("CQE_RES", struct io_uring_cqe, res);
	OFFSET("CQE_FLAGS", struct io_uring_cqe, flags);
	OFFSET("CQE_BIG", struct io_uring_cqe, big_cqe);
	SIZE("CQE_SIZE", struct io_uring_cqe);
	VALUE("CQE32_SIZE", 2 * sizeof(struct io_uring_cqe));

	OFFSET("GETEVENTS_ARG_SIGMASK", struct io_uring_getevents_arg, sigmask);
	OFFSET("GETEVENTS_ARG_SIGMASK_SZ", struct io_uring_getevents_arg, sigmask_sz);
	OFFSET("GETEVENTS_ARG_TS", struct io_uring_getevents_arg, ts);
	SIZE("GETEVENTS_ARG_SIZE", struct io_uring_getevents_arg);

	OFFSET("PROBE_LAST_OP", struct io_uring_probe, last_op);
	OFFSET("PROBE_OPS_LEN", struct io_uring_probe, ops_len);
	OFFSET("PROBE_OPS", struct io_uring_probe, ops);
	SIZE("PROBE_OP_SIZE", struct io_uring_probe_op);
	OFFSET("PROBE_OP_FLAGS", struct io_uring_probe_op, flags);

	return abi_end();
}
