//! Plain, left-aligned text tables: a header row and columns separated by two spaces.

pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in `\n`, with no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key/value lines for `show` commands: keys padded to the same width.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(format!("{k:<width$}  {v}").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_and_trims() {
        let mut t = Table::new(&["ID", "NODE", "RATE"]);
        t.row(vec!["1".into(), "node-a".into(), "200 Mbit/s".into()]);
        t.row(vec!["12".into(), "b".into(), String::new()]);
        assert_eq!(
            t.render(),
            "ID  NODE    RATE\n1   node-a  200 Mbit/s\n12  b\n"
        );
    }

    #[test]
    fn header_only() {
        let t = Table::new(&["A", "B"]);
        assert_eq!(t.render(), "A  B\n");
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut t = Table::new(&["X", "Y"]);
        t.row(vec!["µµ".into(), "1".into()]);
        assert_eq!(t.render(), "X   Y\nµµ  1\n");
    }

    #[test]
    fn key_values() {
        assert_eq!(
            fields(&[
                ("id", "7".into()),
                ("node", "n1".into()),
                ("reason", String::new())
            ]),
            "id      7\nnode    n1\nreason\n"
        );
    }
}
