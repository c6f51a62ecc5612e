"""Mimics ``tensorrt_llm/mapping.py`` ``Mapping``: rank layout for tensor parallelism (TP only here)."""


class Mapping:
    def __init__(self, world_size=1, rank=0, gpus_per_node=8, *, cp_size=1, cp_config=None, tp_size=1,
                 pp_size=1, moe_cluster_size=-1, moe_tp_size=-1, moe_ep_size=-1, attn_tp_size=-1, attn_cp_size=-1,
                 enable_attention_dp=False, enable_lm_head_tp_in_adp=False):
        if pp_size != 1 or cp_size != 1 or enable_attention_dp:
            raise NotImplementedError("the double implements tensor parallelism only (pp_size = cp_size = 1)")
        if world_size != tp_size * pp_size:
            raise ValueError(f"world_size {world_size} != tp_size {tp_size} * pp_size {pp_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.world_size, self.rank, self.gpus_per_node = world_size, rank, gpus_per_node
        self.tp_size, self.pp_size, self.cp_size = tp_size, pp_size, cp_size
        self.enable_attention_dp = enable_attention_dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return 0

    def has_pp(self) -> bool:
        return False

    def is_first_pp_rank(self) -> bool:
        return True

    def is_last_pp_rank(self) -> bool:
        return True

    @property
    def tp_group(self):
        return list(range(self.tp_size))

    @classmethod
    def from_dict(cls, mapping: dict):
        return cls(**mapping)

    def to_dict(self):  # mapping.py MappingBase.to_dict (the double's fields; -1/None for the MoE/CP ones)
        return {"world_size": self.world_size, "rank": self.rank, "gpus_per_node": self.gpus_per_node,
                "cp_size": self.cp_size, "tp_size": self.tp_size, "pp_size": self.pp_size, "moe_tp_size": -1,
                "moe_cluster_size": -1, "moe_ep_size": -1, "attn_tp_size": -1, "attn_cp_size": -1, "cp_config": None,
                "enable_attention_dp": self.enable_attention_dp, "enable_lm_head_tp_in_adp": False}
