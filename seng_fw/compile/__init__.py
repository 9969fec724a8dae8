"""Policy -> nftables: the compiler (`compiler`), the nftables object model rendered as
JSON and nft text (`nft`), disjoint interval boxes for concatenated sets (`boxes`), the
live ruleset (`live`) and the commands (`cli`)."""
