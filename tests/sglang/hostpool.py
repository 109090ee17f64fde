"""A CPU stand-in for SGLang's MHA host pool (page_first layout): exactly the methods HiCache storage
uses (``page_size``, ``dtype``, ``get_data_page``, ``get_dummy_flat_data_page``,
``set_from_flat_data_page``), with the same shapes and semantics as sglang's MHATokenToKVPoolHost,
whose real class needs CUDA to construct."""

import torch


class CpuHostPool:
    def __init__(self, pages: int = 32, page_size: int = 16, layer_num: int = 2, head_bytes: int = 256,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.page_size = page_size
        self.layer_num = layer_num
        self.dtype = dtype
        self.item_bytes = page_size * head_bytes // dtype.itemsize  # elements per layer per page
        self.kv_buffer = torch.zeros(pages, layer_num, self.item_bytes, dtype=dtype)
        self.layout = "page_first"

    def get_data_page(self, index, flat: bool = True):
        page = self.kv_buffer[int(index) // self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        return torch.zeros((self.layer_num, self.item_bytes), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index, data_page):
        self.kv_buffer[int(index) // self.page_size].copy_(
            data_page.view(self.dtype).reshape(self.layer_num, self.item_bytes)
        )

    def fill_random(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=g).to(self.dtype))

    def host_indices(self, pages: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(p * self.page_size, (p + 1) * self.page_size) for p in pages])
